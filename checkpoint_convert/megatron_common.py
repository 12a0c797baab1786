"""What the Megatron converters (legacy `torch`: checkpoint_convert.megatron; `torch_dist`: megatron_dist_read and
megatron_dist_write) share: the model's meshtron tensors as meta tensors, layout checks before anything is written,
and `Ours`, meshtron tensors converted on demand from another format's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from checkpoint_convert.hf import SafetensorsDir, ignored_hf_tensor
from checkpoint_convert.mapping import Unit
from checkpoint_convert.models.megatron_names import SPECS
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model import GPTModel
from trainer.model.shapes import check_tp_divisibility

__all__ = ["Ours", "MetaShapes", "meshtron_shapes", "check_layout", "check_hf_tensors", "common_dtype"]


def meshtron_shapes(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every meshtron parameter of the full model, as meta tensors (unpadded vocabulary)."""
    with _MetaParameters():
        model = GPTModel(cfg)
    return {n: p if p.is_meta else p.to("meta") for n, p in model.named_parameters()}


class _MetaParameters(TorchFunctionMode):
    """Tensor factories make meta tensors and in-place initialisation of meta tensors does nothing; everything else
    (the rotary buffer's arithmetic) runs on the CPU. The same parameters as building under torch.device("meta"),
    without meta kernels written in Python: the first of those imports torch._dynamo, about a second."""

    FACTORIES = frozenset((torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                           torch.empty_strided))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            return func(*args, **{**kwargs, "device": "meta"})
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            return target  # nn.init.normal_, Tensor.uniform_, ...: no data to fill
        return func(*args, **kwargs)


class MetaShapes(TorchFunctionMode):
    """The dry runs' mode: torch.cat and torch.stack (the experts') of meta tensors computed here, from shapes alone.
    torch's own meta kernels for them are written in Python and the first call imports torch._dynamo (about a
    second, more than converting a small model). Anything else runs as usual; sizes that do not fit raise
    RuntimeError, as torch.cat and torch.stack do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat or func is torch.stack:
            tensors = list(args[0] if args else kwargs["tensors"])
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if tensors and all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors) and "out" not in kwargs:
                if func is torch.cat:
                    return _meta_cat(tensors, dim)
                if any(t.shape != tensors[0].shape for t in tensors):
                    raise RuntimeError(f"stack expects each tensor to be equal size, but got "
                                       f"{[list(t.shape) for t in tensors]}")
                d = dim % (tensors[0].dim() + 1)
                return _meta_cat([t.unsqueeze(d) for t in tensors], d)
        return func(*args, **kwargs)


def _meta_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    first = tensors[0]
    d = dim % max(first.dim(), 1)
    for t in tensors[1:]:
        if t.dim() != first.dim() or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != d):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {d}: {list(first.shape)} and "
                               f"{list(t.shape)}")
    dtype = first.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = list(first.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    return torch.empty(shape, dtype=dtype, device="meta")


def check_layout(cfg: ModelConfig, tp: int, pp: int, spec: str, vocab_divisible_by: int) -> None:
    if spec not in SPECS:
        raise ConfigError(f"spec={spec!r} is not supported; expected one of {sorted(SPECS)}")
    for name, value in (("tp", tp), ("pp", pp), ("vocab_divisible_by", vocab_divisible_by)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    check_tp_divisibility(cfg, tp, tp_name="tp", field_prefix="")
    if cfg.num_layers % pp:
        raise ConfigError(f"pp={pp} does not divide num_layers={cfg.num_layers}; every pipeline stage "
                          f"gets the same number of layers")


def check_hf_tensors(src: SafetensorsDir, units: list[Unit], cfg: ModelConfig, where: Path) -> None:
    """Every tensor the units need is in `src`, and `src` holds nothing the model has no place for."""
    used = set()
    for unit in units:
        missing = [n for n in unit.theirs if n not in src]
        if "lm_head.weight" in missing:
            raise KeyError(f"{where}: lm_head.weight is missing but the config has tie_word_embeddings=false")
        if missing:
            raise KeyError(f"{where}: tensors {missing} are missing (needed for {list(unit.ours)})")
        used.update(unit.theirs)
    unexpected = sorted(n for n in src.files if n not in used and not ignored_hf_tensor(n, cfg))
    if unexpected:
        raise KeyError(f"{where}: tensors the {cfg.family} model has no place for: {unexpected}")


def common_dtype(tensors) -> torch.dtype:
    floats = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else torch.float32


class Ours:
    """meshtron tensors by name, converted on demand from another format's tensors.

    Each unit is converted once and its outputs kept until taken, so a fused tensor feeding two
    consumers (linear_fc1 -> gate and up) is read once. Every output's shape is checked.
    """

    def __init__(self, units: list[Unit], fetch: Callable[[str], torch.Tensor], cfg: ModelConfig,
                 expected: dict[str, torch.Tensor], what: str):
        self.by_name = {n: u for u in units for n in u.ours}
        self.fetch, self.cfg, self.expected, self.what = fetch, cfg, expected, what
        self.pending: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.pending:
            unit = self.by_name[name]
            theirs = [self.fetch(n) for n in unit.theirs]
            try:
                ours = unit.convert_to_ours(theirs, self.cfg)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"{self.what}: cannot convert {_shapes(unit.theirs, theirs)}: {e}") from e
            for n, t in ours.items():
                if t.shape != self.expected[n].shape:
                    raise ValueError(f"{self.what}: {_shapes(unit.theirs, theirs)} gives {n} of shape "
                                     f"{list(t.shape)}, but the model's is {list(self.expected[n].shape)}")
            self.pending.update(ours)
        return self.pending.pop(name)


def _shapes(names, tensors) -> str:
    return ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, tensors))
