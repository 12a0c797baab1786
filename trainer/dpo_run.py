"""trainer.objective=dpo in a run: the reference model's log-probs, each step's pairs, validation over pairs.

The reference (dpo.reference):

* ``precompute``: before the first step, one forward-only pass with the initial weights over every row of the
  training split (and the validation split) writes each sequence's summed completion log-prob to a table
  indexed by sample id, ``<data cache>/reference/<key>.npy``. The key holds the split's token cache and
  document span and the initial weights' identity (model.hf_path's config/index hash or the seed and model
  config; a LoRA init_from; the precision), so a rerun or a resume reuses it. A resumed run no longer has the
  initial weights: it refuses to start when its table is missing instead of computing a wrong one.
* ``online``: a frozen copy of the initial model, built and sharded exactly like the policy (same mesh, no
  optimizer state, no gradients), runs forward-only over the step's rows before the policy's forward and
  backward; its per-sequence sums go into the loss of each micro-batch as the table's would.
* ``none``: the reference-free losses (simpo, orpo).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.config import Config
from trainer.dpo import PairBatch, pair_metrics
from trainer.errors import ConfigError

REFERENCE_VERSION = 1


def check_dpo(cfg: Config) -> None:
    """trainer.objective=dpo against the rest of the config, before anything is allocated."""
    d, objective = cfg.data, cfg.trainer.objective
    fmts = [s.format for s in d.sources] if d.sources else [d.format]
    preference = [f == "preference" for f in fmts]
    if objective == "dpo" and not all(preference):
        raise ConfigError(f"trainer.objective=dpo needs preference pairs: data.format={fmts[0]!r}; use "
                          f"data=preference (data.format=preference)")
    if objective != "dpo" and any(preference):
        raise ConfigError(f"data.format=preference holds pairs for trainer.objective=dpo, but trainer.objective="
                          f"{objective!r}; set trainer.objective=dpo (or train SFT on chat data)")
    if objective != "dpo":
        return
    cfg.dpo.validate()
    if len(d.sources) > 1:
        raise ConfigError(f"trainer.objective=dpo with {len(d.sources)} data.sources: blends of preference sets are "
                          f"not supported yet; concatenate the .jsonl files into one data.path")


def reference_identity(cfg: Config) -> dict:
    """What the reference log-probs depend on besides the data: the initial weights and the numerics."""
    from trainer.checkpoint import base_identity

    lora = cfg.model.lora
    init_from = None
    if lora.enabled and lora.init_from:
        path = Path(lora.init_from)
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*")) if f.is_file()]
        init_from = [str(path.resolve()), stamp]
    return {"weights": base_identity(cfg), "lora_init_from": init_from,
            "lora_base": [lora.base_dtype, lora.base_quant] if lora.enabled else None,
            "precision": cfg.trainer.precision,
            "fp8": dataclasses.asdict(cfg.trainer.fp8) if cfg.trainer.precision == "fp8" else None}


def _rows_identity(rows) -> dict:
    from trainer.data.row_index import RowIndex

    if not isinstance(rows, RowIndex) or rows.corpus.key is None:
        raise ConfigError(f"dpo.reference=precompute needs one cached preference source per split (got "
                          f"{type(rows).__name__}); use a single data.path")
    return {"corpus": rows.corpus.key, "span": list(rows.span), "base": rows.sample_id_base,
            "docs": rows.corpus.num_docs}


def table_path(cfg: Config, rows) -> Path:
    from trainer.data.pretrain import default_cache_dir

    text = json.dumps({"v": REFERENCE_VERSION, "rows": _rows_identity(rows), "model": reference_identity(cfg)},
                      sort_keys=True, default=str)
    return default_cache_dir(cfg.data) / "reference" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npy"


@torch.no_grad()
def compute_table(pm, rows, cfg: Config, device: torch.device, is_main: bool, what: str) -> np.ndarray:
    """Summed completion log-prob of every sequence of ``rows`` under the model as it is (indexed by sample
    id; NaN where the span has none), every rank running its share of each global batch."""
    from parallel.collectives import sum_tokens_and_ranks
    from trainer.data.build import iter_batches_in_order
    from trainer.step import forward_doc_losses
    from tqdm.auto import tqdm

    G = cfg.trainer.global_batch_size
    n = -(-rows.num_rows // G)
    table = np.full(rows.sample_id_base + rows.corpus.num_docs, np.nan)
    pm.train(False)
    bar = tqdm(total=n, desc=f"reference log-probs of the {what} split (dpo.reference=precompute)", unit=" batch",
               disable=not is_main, file=sys.stderr, mininterval=5.0)
    try:
        for gb in iter_batches_in_order(rows, G):
            doc = forward_doc_losses(pm, gb, cfg, device)
            k = len(doc.keys)
            total = sum_tokens_and_ranks(torch.cat([doc.sums, doc.counts]), doc.sums.new_zeros(0), pm.mesh).cpu()
            table[doc.keys.cpu().numpy()] = -total[:k].numpy()
            bar.update(1)
    finally:
        bar.close()
        pm.train(True)
    return table


def reference_table(pm, rows, cfg: Config, device: torch.device, is_main: bool, what: str,
                    resuming: Optional[str]) -> np.ndarray:
    """The split's reference table: read from the cache, else computed now with the initial weights (refused
    when the run resumes, ``resuming`` naming the checkpoint: its weights are no longer the initial ones)."""
    from trainer.data.pretrain import save_npy_atomic
    from trainer.distributed import broadcast_str

    path = table_path(cfg, rows)
    world = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    found = path.is_file()
    if world:  # one answer for every rank (a shared cache directory, as for the token cache)
        found = broadcast_str("1" if found else "") == "1"
    if found:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
        if table.shape != (rows.sample_id_base + rows.corpus.num_docs,):
            raise ConfigError(f"{path} holds {table.shape} reference log-probs, not one per sequence of the {what} "
                              f"split ({rows.sample_id_base + rows.corpus.num_docs}); delete it to recompute")
        return table
    if resuming is not None:
        raise ConfigError(f"dpo.reference=precompute: the reference log-probs of the initial weights for the {what} "
                          f"split ({path}) are missing, and this run resumes from {resuming}, whose weights are no "
                          f"longer the initial ones; restore that file, or start a new run (another "
                          f"trainer.output_dir; to start DPO from a trained meshtron checkpoint, convert it with "
                          f"meshtron-convert meshtron-to-hf and pass model.hf_path)")
    table = compute_table(pm, rows, cfg, device, is_main, what)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, table)
    return table


class DpoObjective:
    """The run's side of trainer.objective=dpo: reference tables (or the online reference model), the step's
    PairBatch, validation over pairs."""

    def __init__(self, cfg: Config, train_table: Optional[np.ndarray], val_table: Optional[np.ndarray],
                 ref_pm=None):
        self.cfg = cfg
        self.train_table, self.val_table, self.ref_pm = train_table, val_table, ref_pm

    @staticmethod
    def _lookup(table: Optional[np.ndarray]):
        return None if table is None else (lambda keys: np.asarray(table[keys]))

    def pairs(self, batch: dict[str, torch.Tensor], device: torch.device) -> PairBatch:
        return PairBatch(self.cfg.dpo, batch, device, self._lookup(self.train_table))

    def online_reference(self, pairs: PairBatch, batch: dict[str, torch.Tensor], device: torch.device,
                         cp_group) -> Optional[torch.Tensor]:
        """dpo.reference=online: the frozen copy's per-sequence log-prob sums over this rank's rows, set as the
        pairs' reference (summed over cp: every cp rank needs whole sums); returns this rank's unreduced sums
        for the step's metrics (reduced over the mesh with the policy's)."""
        if self.ref_pm is None:
            return None
        from trainer.step import forward_doc_losses

        doc = forward_doc_losses(self.ref_pm, batch, self.cfg, device)
        local = -doc.sums
        whole = local.clone()
        if cp_group is not None:
            torch.distributed.all_reduce(whole, group=cp_group)
        pairs.ref = whole.float()
        return local

    def evaluate(self, pm, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
        """The preference loss and metrics over every validation pair (val_loss, val_rewards/...)."""
        from parallel.collectives import sum_tokens_and_ranks
        from trainer.step import forward_doc_losses

        logps, counts, refs, chosen_tokens = [], [], [], 0
        pm.train(False)
        try:
            for gb in batches:
                pb = PairBatch(self.cfg.dpo, gb, device, self._lookup(self.val_table))
                doc = forward_doc_losses(pm, gb, self.cfg, device)
                parts = [doc.sums, doc.counts]
                if self.ref_pm is not None:
                    parts.append(forward_doc_losses(self.ref_pm, gb, self.cfg, device).sums)
                k = len(pb.host_keys)
                total = sum_tokens_and_ranks(torch.cat(parts), doc.sums.new_zeros(0), pm.mesh).cpu().double()
                logps.append(-total[:k])
                counts.append(total[k:2 * k])
                refs.append(-total[2 * k:3 * k] if self.ref_pm is not None else torch.from_numpy(pb.host_ref))
                chosen_tokens += pb.chosen_tokens
        finally:
            pm.train(True)
        m = pair_metrics(self.cfg.dpo, torch.cat(logps), torch.cat(counts), torch.cat(refs), chosen_tokens)
        return {f"val_{k}": v for k, v in m.items()}


def build_dpo(cfg: Config, pm, train_rows, val_rows, device: torch.device, is_main: bool,
              resuming: Optional[str], build_reference_model) -> Optional[DpoObjective]:
    """The run's DpoObjective (None for trainer.objective=lm). Runs before a checkpoint is loaded: the policy
    still holds the initial weights that a precomputed reference is made with."""
    if cfg.trainer.objective != "dpo":
        return None
    ref = cfg.dpo.reference
    if ref == "precompute":
        train = reference_table(pm, train_rows, cfg, device, is_main, "train", resuming)
        val = reference_table(pm, val_rows, cfg, device, is_main, "validation", resuming) if val_rows else None
        return DpoObjective(cfg, train, val)
    if ref == "online":
        ref_pm = build_reference_model()
        for p in ref_pm.parameters():
            p.requires_grad_(False)
        ref_pm.train(False)
        return DpoObjective(cfg, None, None, ref_pm)
    return DpoObjective(cfg, None, None)
