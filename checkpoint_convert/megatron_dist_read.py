"""Megatron-LM `torch_dist` checkpoints (the layout: checkpoint_convert.megatron_dist) -> HF safetensors or
meshtron's names, tensor by tensor, in one process without megatron.

Megatron tensors are named as in checkpoint_convert.models.megatron_names (MEGATRON_TE: torch_dist names the
norms the TE way under both layer specs) and found under whichever key form the checkpoint uses: stacked over
layers (`decoder.layers.<rest>`, at index N), per layer (`decoder.layers.N.<rest>`), fc1 split in `_w`/`_v`.
Each is read from only its own chunks; the HF side is written as for the legacy format (one tensor in memory).
Routed experts are one global tensor per layer, `mlp.experts.experts.linear_fc1.weight` [E, 2F, H] (stacked over
layers too unless layers are heterogeneous), or with singleton_local_shards one per expert,
`decoder.layers.N.mlp.experts.experts.<e>.linear_fc1.weight_w` / `_v`, stacked back here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from checkpoint_convert.detect import MEGATRON_TORCH_DIST, refuse_other_kinds
from checkpoint_convert.megatron import meshtron_state, read_checkpoint, write_hf_dir
from checkpoint_convert.megatron_common import Ours, meshtron_shapes
from checkpoint_convert.megatron_dist import CONFIG_FILE, DcpFiles, check_config, read_common_state
from checkpoint_convert.megatron_format import TRACKER, PathLike, config_from_args, resolve_iteration_dir
from checkpoint_convert.models.megatron_names import VOCAB, layer_of, megatron_units, tp_split
from checkpoint_convert.safetensors_files import DEFAULT_MAX_SHARD_BYTES, check_out_dir
from trainer.config import ModelConfig

__all__ = ["megatron_dist_to_hf", "load_megatron_dist_as_meshtron", "TorchDistCheckpoint"]

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # model tensors: every one must be placed


@dataclass(frozen=True)
class _Stored:
    """Where a Megatron tensor lies: DCP keys concatenated on dim 0 (fc1's _w, _v), each either holding the
    tensor itself (layer None) or stacked over layers with it at index `layer`; with `experts` > 0 the keys are
    that many equal groups (one per expert), each concatenated, then stacked."""

    keys: tuple[str, ...]
    layer: Optional[int]
    experts: int = 0

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.experts:
            n = len(parts) // self.experts
            return torch.stack([torch.cat(parts[e * n:(e + 1) * n]) for e in range(self.experts)])
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class TorchDistCheckpoint:
    """One iteration of a torch_dist checkpoint: its args, and each Megatron tensor read on demand."""

    def __init__(self, megatron_dir: PathLike, iteration: Optional[int] = None):
        root = Path(megatron_dir)
        refuse_other_kinds(root, MEGATRON_TORCH_DIST)
        here = iteration is None and not (root / TRACKER).is_file() and (root / CONFIG_FILE).is_file()
        self.dir, self.iteration = (root, 0) if here else resolve_iteration_dir(root, iteration)
        self.root = root
        check_config(self.dir)
        self.files = DcpFiles(self.dir)
        self.tensors = self.files.tensors
        self.args = read_common_state(self.files).get("args")
        if self.args is None or not hasattr(self.args, "num_layers"):
            raise ValueError(f"{self.dir}: its common state holds no args namespace; cannot tell the model's shape")
        self.cfg = config_from_args(self.args, name=root.name)
        self.shapes = meshtron_shapes(self.cfg)
        # Only the TE spec's MoE layers keep a pre_mlp_layernorm of their own (megatron_names.layer_tables).
        self.spec = "te" if any(".pre_mlp_layernorm." in k for k in self.tensors) else "local"
        self._index()

    def _index(self) -> None:
        """Megatron name -> where it is stored, for every tensor of the model the args describe; no model tensor
        of the checkpoint may be left over (MoE experts, say, or a family the args do not say)."""
        self.where: dict[str, _Stored] = {}
        missing = []
        for unit in megatron_units(self.shapes, self.cfg, self.spec, "dist"):
            for name in unit.theirs:
                found = self._locate(name)
                if found is None:
                    missing.append(name)
                else:
                    self.where[name] = found
        if "output_layer.weight" in missing and not self.cfg.tie_word_embeddings:
            raise KeyError(f"{self.dir}: output_layer.weight is missing but args say "
                           f"untie_embeddings_and_output_weights=True")
        used = {k for s in self.where.values() for k in s.keys}
        unexpected = sorted(k for k in self.tensors if k.startswith(_MODEL_PREFIXES) and k not in used)
        problems = ([f"lacks {_few(missing)}, which the {self.cfg.family} model its args describe has"] * bool(missing)
                    + [f"has {_few(unexpected)}, which that model has no place for"] * bool(unexpected))
        if problems:
            raise KeyError(f"{self.dir}: " + "; ".join(problems))

    def _locate(self, name: str) -> Optional[_Stored]:
        at = layer_of(name)
        if at is None:
            return _Stored((name,), None) if name in self.tensors else None
        layer, rest = at
        forms = [(rest,)]
        experts = rest.startswith("mlp.experts.experts.")
        if rest.endswith("linear_fc1.weight") and not experts:  # singleton_local_shards: gate and up apart
            forms.append((rest + "_w", rest + "_v"))
        if experts:  # singleton_local_shards: one tensor per expert (fc1's gate and up apart), per layer only
            head, tail = rest.rsplit(".", 2)[0], rest.split(".", 3)[3]
            parts = (tail + "_w", tail + "_v") if tail.startswith("linear_fc1.") else (tail,)
            e = self.cfg.moe.num_moe_experts
            single = tuple(f"decoder.layers.{layer}.{head}.{i}.{p}" for i in range(e) for p in parts)
            if all(k in self.tensors for k in single):
                return _Stored(single, None, e)
        for parts in forms:
            stacked = tuple(f"decoder.layers.{p}" for p in parts)
            if all(k in self.tensors for k in stacked):
                for k in stacked:
                    if self.tensors[k].size[0] != self.cfg.num_layers:
                        raise ValueError(f"{self.dir}: {k} {list(self.tensors[k].size)} is stacked over "
                                         f"{self.tensors[k].size[0]} layers, but args say num_layers="
                                         f"{self.cfg.num_layers}")
                return _Stored(stacked, layer)
            single = tuple(f"decoder.layers.{layer}.{p}" for p in parts)
            if all(k in self.tensors for k in single):
                return _Stored(single, None)
        return None

    def _part_shape(self, key: str, layer: Optional[int]) -> list[int]:
        size = self.tensors[key].size
        return list(size[1:] if layer is not None else size)

    def padded_rows(self) -> int:
        """Vocabulary rows the checkpoint holds, padding included (the saving run's padded vocabulary)."""
        return self.tensors[self.where["embedding.word_embeddings.weight"].keys[0]].size[0]

    def meta(self, name: str) -> torch.Tensor:
        """The full Megatron tensor's shape and dtype, as a meta tensor (vocabulary un-padded)."""
        s = self.where[name]
        parts = [torch.empty(self._part_shape(k, s.layer), dtype=self.tensors[k].properties.dtype, device="meta")
                 for k in s.keys]
        if s.experts:  # torch.stack of meta tensors would import torch._dynamo (megatron_common.MetaShapes)
            one = _Stored(s.keys[:len(s.keys) // s.experts], None).combine(parts[:len(s.keys) // s.experts])
            t = torch.empty([s.experts, *one.shape], dtype=one.dtype, device="meta")
        else:
            t = s.combine(parts)
        if tp_split(name) == VOCAB:
            if t.shape[0] < self.cfg.vocab_size:
                raise ValueError(f"{self.dir}: {name} has {t.shape[0]} vocabulary rows, fewer than vocab_size="
                                 f"{self.cfg.vocab_size}")
            t = t[:self.cfg.vocab_size]
        return t

    def full(self, name: str) -> torch.Tensor:
        """The full Megatron tensor (vocabulary un-padded: the padding rows are not even read)."""
        s = self.where[name]
        parts = []
        for key in s.keys:
            shape = self._part_shape(key, s.layer)
            if tp_split(name) == VOCAB:
                shape[0] = self.cfg.vocab_size
            if s.layer is None:
                parts.append(self.files.tensor(key, [0] * len(shape), shape))
            else:
                parts.append(self.files.tensor(key, [s.layer] + [0] * len(shape), [1] + shape)[0])
        return s.combine(parts)

    def meshtron(self, fetch: Callable[[str], torch.Tensor]) -> Ours:
        units = megatron_units(self.shapes, self.cfg, self.spec, "dist")
        return Ours(units, fetch, self.cfg, self.shapes, what=str(self.dir))


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ===================================================================================== conversions


def _checkpoint(megatron_dir: PathLike, iteration: Optional[int], hf_config_dir: Optional[PathLike]
                ) -> TorchDistCheckpoint:
    return read_checkpoint(megatron_dir, iteration, hf_config_dir, reader=TorchDistCheckpoint)


def load_megatron_dist_as_meshtron(megatron_dir: PathLike, iteration: Optional[int] = None
                                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full state dict in meshtron's names, vocabulary un-padded): GPTModel(cfg).load_state_dict works."""
    return meshtron_state(_checkpoint(megatron_dir, iteration, None))


def megatron_dist_to_hf(megatron_dir: PathLike, out_dir: PathLike, hf_config_dir: Optional[PathLike] = None,
                        iteration: Optional[int] = None, progress: bool = True, *, overwrite: bool = False,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A torch_dist checkpoint (saved at any TP x PP) -> an HF directory, tensor by tensor. Returns out_dir.

    Same contract as checkpoint_convert.megatron.megatron_to_hf: weights keep their dtype, the vocabulary is
    un-padded, config.json comes from hf_config_dir or the args; names and shapes are checked before writing."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    ckpt = _checkpoint(megatron_dir, iteration, hf_config_dir)
    write_hf_dir(ckpt, out, hf_config_dir, progress, overwrite, max_shard_bytes)
    # After the data is read: a chunk that does not load is only found then, and the error stays one line.
    print(ckpt.vocab_note, file=sys.stderr, flush=True)
    return out
