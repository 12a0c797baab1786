"""HF safetensors -> Megatron-LM `torch_dist` (the layout: checkpoint_convert.megatron_dist), in one process.

One conversion serves every TP x PP: the tensors are global and megatron-core reshards them on load. They go
through PyTorch DCP's own writer (FileSystemWriter, one `__0_0.distcp` file, `.metadata` from DCP) with a
planner that builds each chunk only when DCP asks for it: per-layer tensors are stacked over layers as
megatron-core stores them, one [1, ...] chunk per layer, each converted from the HF tensors it needs (mapped
again per read) and dropped once written. DCP keeps the last chunk written of each key until the end, so the
process holds about one layer plus the embedding and output layer, never the model.

Beside it: common.pt (args as Megatron-LM reads them to fine-tune, `content_metadata` as its save_checkpoint
writes it), metadata.json, and the tracker naming `release`, so Megatron-LM loads the model alone (no optimizer,
no rng state) at whatever TP x PP it runs; the source's tokenizer in hf/ (checkpoint_convert.megatron_tokenizer).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from checkpoint_convert.detect import HF, HF_CONFIG, refuse_other_kinds
from checkpoint_convert.hf import SafetensorsDir, pad_vocab_rows, read_config_json, read_hf_config
from checkpoint_convert.mapping import Unit
from checkpoint_convert.megatron_common import (MetaShapes, Ours, check_hf_tensors, check_layout, common_dtype,
                                                 meshtron_shapes)
from checkpoint_convert.megatron_dist import CHECKPOINT_CONFIG, COMMON_FILE, CONFIG_FILE
from checkpoint_convert.megatron_format import CHECKPOINT_VERSION, TRACKER, PathLike, megatron_args
from checkpoint_convert.megatron_moe import check_expert_layout
from checkpoint_convert.lora import PeftMerge
from checkpoint_convert.megatron_tokenizer import copy_tokenizer, record_tokenizer
from checkpoint_convert.models.megatron_names import EXTRA_STATE_MODULES, layer_of, megatron_units
from checkpoint_convert.models.registry import family
from checkpoint_convert.parallel_io import nbytes, one_op_thread, read_ahead
from checkpoint_convert.safetensors_files import ST_DTYPES, byte_progress, check_out_dir, staged_dir
from trainer.config import ModelConfig
from trainer.model.shapes import padded_vocab_size

__all__ = ["hf_to_megatron_dist"]

# Modules with an `_extra_state` per layer, saved as DCP objects `<key>/shard_<layer>_<num_layers>`; megatron-core
# loads every one its model has. The local spec's linears hold None there (what a real save holds; output_layer's
# is dropped by GPTModel.sharded_state_dict). Transformer Engine's modules, the attention kernel and (in some TE
# versions) its norms among them, keep FP8 metadata there: with --spec te the written set is the wider one, since
# an object the model does not ask for is skipped on load, while one it asks for and lacks fails it.
_LINEARS = tuple(m for m in EXTRA_STATE_MODULES if m != "output_layer")
EXTRA_STATE = {"local": _LINEARS,
               "te": _LINEARS + ("self_attention.core_attention", "self_attention.q_layernorm",
                                 "self_attention.k_layernorm")}
# An MoE layer's: the attention's as above, the shared expert's linears, and one per routed expert and linear, those
# global [num_layers, E] (SequentialMLP.sharded_state_dict; `shard_<layer>.<e>_<L>.<E>`).
_SHARED_LINEARS = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
_EXPERT_LINEARS = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
# What Megatron-LM's save_checkpoint records (_build_sharded_state_dict_metadata without the process group, no
# distributed optimizer): its load builds the model's sharded_state_dict with it, so the layout matches ours.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


@dataclass(frozen=True)
class _Entry:
    """One DCP write: a Megatron tensor of one layer (a chunk of its stacked key) or a whole tensor, or an
    `_extra_state` object (unit None)."""

    key: str
    name: str
    unit: Optional[Unit]
    layer: Optional[int]


def hf_to_megatron_dist(hf_dir: PathLike, out_dir: PathLike, tp: int = 1, pp: int = 1, spec: str = "local",
                        vocab_divisible_by: int = 128, progress: bool = True, *, overwrite: bool = False,
                        ep: int = 1, lora: Optional[PathLike] = None) -> Path:
    """Write an HF checkpoint as a Megatron-LM torch_dist `release` checkpoint. Returns out_dir.

    tp, pp and ep are what the args record (tp also pads the vocabulary, to a multiple of vocab_divisible_by x tp);
    megatron-core loads the files at any TP x PP x EP that fits the model. Refusals before anything is written are
    those of checkpoint_convert.megatron.hf_to_megatron (ConfigError, KeyError, ValueError, FileExistsError).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    refuse_other_kinds(hf_dir, HF, HF_CONFIG)
    cfg = read_hf_config(hf_dir)
    check_layout(cfg, tp, pp, spec, vocab_divisible_by)
    check_expert_layout(cfg, tp, ep)
    check_out_dir(out, overwrite)
    padded = padded_vocab_size(cfg.vocab_size, vocab_divisible_by, tp)
    expected = meshtron_shapes(cfg)
    with ExitStack() as stack:
        src = SafetensorsDir(hf_dir, stack)
        hf_units = family(cfg.family).table.units(expected, cfg)
        check_hf_tensors(src, hf_units, cfg, hf_dir)
        merge = PeftMerge(lora, set(src.files)) if lora is not None else None  # --lora: merged as read

        def meta(name: str) -> torch.Tensor:
            sl = src.get_slice(name)
            return torch.empty(sl.get_shape(), dtype=ST_DTYPES[sl.get_dtype()], device="meta")

        def read(name: str) -> torch.Tensor:
            # A mapping of its own per tensor: pages read through a long-lived one would stay resident.
            with safe_open(str(src.files[name]), framework="pt") as f:
                return merge(name, f.get_tensor(name)) if merge else f.get_tensor(name)

        def tensor(entry: _Entry, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
            ours = Ours(hf_units, fetch, cfg, expected, what=str(hf_dir))
            t = entry.unit.convert_to_theirs([ours.take(n) for n in entry.unit.ours], cfg)[entry.name]
            t = pad_vocab_rows(entry.name, t, torch.Size([padded, *t.shape[1:]]))
            return t.unsqueeze(0) if entry.layer is not None else t

        entries = _entries(cfg, expected, spec)
        with MetaShapes():
            shapes = {e: tensor(e, meta) for e in entries if e.unit is not None}  # raises on any mismatch
        items = [_write_item(e, shapes.get(e), cfg.num_layers) for e in entries]
        args = megatron_args(cfg, tp, pp, spec, padded, vocab_divisible_by, common_dtype(shapes.values()), ep)
        args.ckpt_format, args.use_dist_ckpt, args.no_save_optim, args.no_save_rng = "torch_dist", True, True, True
        tokenizer = record_tokenizer(args, read_config_json(hf_dir), hf_dir, out)
        total = sum(math.prod(t.shape) * t.element_size() for t in shapes.values())
        with staged_dir(out, overwrite) as tmp, byte_progress(total, progress, f"writing {out.name}") as bar, \
                one_op_thread():
            (tmp / TRACKER).write_text("release")
            copy_tokenizer(tokenizer, tmp)
            release = tmp / "release"
            release.mkdir()
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                        "num_floating_point_operations_so_far": 0, "content_metadata": CONTENT_METADATA},
                       release / COMMON_FILE)
            by_index = {item.index: e for item, e in zip(items, entries)}
            # DCP asks for the tensors in plan order (one file: no reordering by size); they are read and converted
            # in a thread of their own, a bounded number of bytes ahead of DCP's writes.
            ahead = read_ahead(((e, tensor(e, read).contiguous()) for e in entries if e.unit is not None),
                               lambda item: nbytes(item[1]))
            early: dict[_Entry, torch.Tensor] = {}

            def resolve(item: WriteItem):
                entry = by_index[item.index]
                if entry.unit is None:
                    return _none_object()
                while entry not in early:  # any other order still works, holding what came early
                    got, t = next(ahead, (None, None))
                    if got is None:
                        raise RuntimeError(f"DCP asked for {entry.key} twice, or for an item not in the plan")
                    early[got] = t
                t = early.pop(entry)
                bar.update(nbytes(t))
                return t

            try:
                _dcp_save(release, _StreamingPlanner(items, resolve))
            finally:
                ahead.close()  # stops the reading thread if DCP stopped early
            (release / CONFIG_FILE).write_text(json.dumps(CHECKPOINT_CONFIG))  # last, as megatron-core does
    return out


def _entries(cfg: ModelConfig, shapes: dict[str, torch.Tensor], spec: str) -> list[_Entry]:
    """Every write, layer by layer in model order (embedding first, final norm and output layer last).

    Stacked over layers (`decoder.layers.<rest>`, the layer's [1, ...] chunk) unless megatron-core stores the layers
    one by one (`decoder.layers.<N>.<rest>` whole): it does when the args give moe_layer_freq as a list, which
    they do exactly when meshtron's config has one (a mix of dense and MoE layers; TransformerBlock's
    non_homogeneous_layers)."""
    per_layer = cfg.moe.enabled and cfg.moe.moe_layer_freq is not None
    entries, seen_layers = [], set()
    for unit in megatron_units(shapes, cfg, spec, "dist"):  # torch_dist names dense norms the TE way, both specs
        (name,) = unit.theirs
        at = layer_of(name)
        if at is None:
            entries.append(_Entry(name, name, unit, None))
            continue
        layer, rest = at
        if layer not in seen_layers:  # the layer's objects before its tensors
            seen_layers.add(layer)
            entries += [_Entry(key, key, None, layer) for key in _extra_state_keys(cfg, spec, layer, per_layer)]
        if per_layer:
            entries.append(_Entry(name, name, unit, None))
        else:
            entries.append(_Entry(f"decoder.layers.{rest}", name, unit, layer))
    return entries


def _extra_state_keys(cfg: ModelConfig, spec: str, layer: int, per_layer: bool) -> list[str]:
    """The DCP object keys of one layer's `_extra_state`s, as megatron-core's ShardedObject.unique_key."""
    moe = cfg.moe.is_moe_layer(layer)
    modules = [m for m in EXTRA_STATE[spec] if not (m.endswith("layernorm") and not cfg.qk_layernorm)
               and not (moe and m.startswith("mlp."))]
    if moe and cfg.moe.moe_shared_expert_intermediate_size:
        modules += _SHARED_LINEARS
    prefix, at, of = ((f"decoder.layers.{layer}.", "0", "1") if per_layer
                      else ("decoder.layers.", str(layer), str(cfg.num_layers)))
    keys = [f"{prefix}{m}._extra_state/shard_{at}_{of}" for m in modules]
    if moe:
        experts = cfg.moe.num_moe_experts
        for m in _EXPERT_LINEARS:
            keys += [f"{prefix}{m}._extra_state/shard_{e}_{experts}" if per_layer else
                     f"{prefix}{m}._extra_state/shard_{layer}.{e}_{cfg.num_layers}.{experts}" for e in range(experts)]
    return keys


def _write_item(entry: _Entry, t: Optional[torch.Tensor], num_layers: int) -> WriteItem:
    if entry.unit is None:
        return WriteItem(index=MetadataIndex(entry.key), type=WriteItemType.BYTE_IO)
    if entry.layer is None:
        offsets, size = torch.Size([0] * t.dim()), t.shape
    else:
        offsets, size = torch.Size([entry.layer] + [0] * (t.dim() - 1)), torch.Size([num_layers, *t.shape[1:]])
    return WriteItem(index=MetadataIndex(entry.key, offsets), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, t.shape),
                                                 properties=TensorProperties(dtype=t.dtype), size=size))


def _dcp_save(path: Path, planner: "_StreamingPlanner") -> None:
    """DCP's save in this process alone (no process group); its wrapped failure -> the failure itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # the intent, here
        try:
            # No fsync, like the safetensors and legacy writers (and cp): the staged directory is renamed into place
            # only once everything is written, so an interrupted conversion never looks complete.
            writer = dcp.FileSystemWriter(path, single_file_per_rank=True, thread_count=1, sync_files=False)
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        except dcp.CheckpointException as e:
            raise next(iter(e.failures.values()))[0] from None


def _none_object() -> io.BytesIO:
    """An `_extra_state` object as megatron-core saves a ShardedObject: torch.save of the list of its data."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


class _StreamingPlanner(DefaultSavePlanner):
    """DCP's default planner over a plan made here: DCP validates it, builds .metadata from it and lays out the
    file, and asks `resolve` for each item's data as it writes it (tensors in plan order, after the objects)."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.resolve = items, resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self.resolve(write_item)
