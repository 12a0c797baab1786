"""Declarative name tables between meshtron parameters and another format (HF, Megatron-LM legacy).

A table is a tuple of rules. Each rule names one or more meshtron tensors ("ours") and one or more
tensors of the other format ("theirs"), with `*` standing for a layer index, plus a pair of pure
tensor transforms between the two sides:

    rename("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")
    fuse_qkv("decoder.layers.*.self_attention.linear_qkv.weight",
             "model.layers.*.self_attn.q_proj.weight", "...k_proj.weight", "...v_proj.weight")
    stack_experts("decoder.layers.*.mlp.experts.linear_fc2.weight", "model.layers.*.mlp.experts.#.down_proj.weight")

`#` stands for an expert index: the rule binds one name per expert (model.moe.num_moe_experts of them).
Everything here works on full (unsharded) tensors and names; placing them on TP/PP ranks is elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from trainer.config import ModelConfig

# (tensors, cfg) -> tensors. Transforms are pure: no in-place edits of their inputs.
Transform = Callable[[Sequence[torch.Tensor], ModelConfig], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------- typed transforms


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
                   head_dim: int) -> torch.Tensor:
    """Separate q [H*d, ...], k [G*d, ...], v [G*d, ...] -> Megatron's per-group [q_g; k_g; v_g] rows.

    Works for weights (2-D) and biases (1-D) alike: only dim 0 is rearranged.
    """
    G, d, rest = num_query_groups, head_dim, q.shape[1:]
    _check_rows("q", q, None, d, G)
    _check_rows("k", k, G * d, d, G)
    _check_rows("v", v, G * d, d, G)
    # q's rows are head-major, and the heads of group g are contiguous, so [G, hpg*d] splits it by group.
    grouped = torch.cat([q.reshape(G, -1, *rest), k.reshape(G, d, *rest), v.reshape(G, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`interleave_qkv`: per-group [q_g; k_g; v_g] rows -> contiguous q, k, v."""
    G, d, rest = num_query_groups, head_dim, qkv.shape[1:]
    if qkv.shape[0] % (G * d) or qkv.shape[0] // (G * d) < 3:
        raise ValueError(f"fused qkv with {qkv.shape[0]} rows cannot hold {G} query groups of head_dim {d}")
    grouped = qkv.reshape(G, -1, *rest)
    q, k, v = grouped.split([grouped.shape[1] - 2 * d, d, d], dim=1)
    # Always copies: with one group the slices would otherwise share storage, which safetensors refuses.
    return tuple(t.reshape(-1, *rest).clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _check_rows(what: str, t: torch.Tensor, rows: int | None, d: int, groups: int) -> None:
    ok = t.shape[0] == rows if rows is not None else t.shape[0] > 0 and t.shape[0] % (groups * d) == 0
    if not ok:
        want = f"{rows} rows" if rows is not None else f"a multiple of {groups * d} rows"
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected {want} "
                         f"({groups} query groups of head_dim {d})")


# -------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """`ours` <-> `theirs` tensor names (with `*` wildcards) and the transforms between them."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_theirs: Transform
    to_ours: Transform
    # `theirs` holds one name with `#`, expanded to one name per expert when the rule is bound.
    per_expert: bool = False

    def __post_init__(self):
        stars = {n.count("*") for n in self.ours + self.theirs}
        if len(stars) != 1:
            raise ValueError(f"rule {self.ours} <-> {self.theirs}: every name needs the same number of '*'")
        if self.per_expert != any("#" in n for n in self.theirs) or any("#" in n for n in self.ours):
            raise ValueError(f"rule {self.ours} <-> {self.theirs}: '#' (the expert index) belongs in the other "
                             f"format's names of a per-expert rule only")


def _identity(tensors, cfg):
    return tuple(tensors)


def rename(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,), _identity, _identity)


def fuse_qkv(ours: str, q: str, k: str, v: str) -> Rule:
    """Our interleaved linear_qkv (weight or bias) <-> their separate q, k and v projections."""
    return Rule(
        (ours,), (q, k, v),
        to_theirs=lambda t, cfg: split_qkv(t[0], cfg.num_query_groups, cfg.head_dim),
        to_ours=lambda t, cfg: (interleave_qkv(*t, cfg.num_query_groups, cfg.head_dim),),
    )


def stack_experts(ours: str, theirs: str) -> Rule:
    """Our experts stacked on dim 0 ([E, ...]) <-> their one tensor per expert (`#` in `theirs`)."""
    return Rule(
        (ours,), (theirs,), per_expert=True,
        to_theirs=lambda t, cfg: tuple(e.clone(memory_format=torch.contiguous_format) for e in t[0].unbind(0)),
        to_ours=lambda t, cfg: (torch.stack(tuple(t)),),
    )


@dataclass(frozen=True)
class Unit:
    """A rule with its wildcards bound: concrete names on both sides, converted together."""

    rule: Rule
    ours: tuple[str, ...]
    theirs: tuple[str, ...]

    def convert_to_theirs(self, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return dict(zip(self.theirs, self.rule.to_theirs(tensors, cfg), strict=True))

    def convert_to_ours(self, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return dict(zip(self.ours, self.rule.to_ours(tensors, cfg), strict=True))


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"(\d+)") + r"\Z")


def _bind(name: str, values: tuple[str, ...]) -> str:
    for value in values:
        name = name.replace("*", value, 1)
    return name


def _expand_experts(rule: Rule, theirs: tuple[str, ...], cfg: Optional[ModelConfig], name: str) -> tuple[str, ...]:
    if not rule.per_expert:
        return theirs
    if cfg is None or not cfg.moe.enabled:
        raise ValueError(f"{name!r} is converted per expert: the conversion needs a model config with "
                         f"model.moe.num_moe_experts set")
    return tuple(n.replace("#", str(e)) for n in theirs for e in range(cfg.moe.num_moe_experts))


@dataclass(frozen=True)
class MappingTable:
    rules: tuple[Rule, ...]

    def with_rules(self, *rules: Rule) -> "MappingTable":
        """A new table (this one is unchanged): these rules added to this table's, each replacing any rule that
        covers one of its `ours` names. How a family's table builds on its base family's."""
        replaced = {n for r in rules for n in r.ours}
        kept = tuple(r for r in self.rules if not replaced.intersection(r.ours))
        return MappingTable(kept + tuple(rules))

    def units(self, our_names: Iterable[str], cfg: Optional[ModelConfig] = None) -> list[Unit]:
        """Group our parameter names into conversion units, in the order the names come. Per-expert rules
        need `cfg` (the number of experts).

        Raises KeyError for a name no rule covers, and for a unit whose other `ours` names are absent
        (e.g. linear_fc1_gate without linear_fc1_up when a Megatron rule fuses the two).
        """
        patterns = [(rule, [_pattern(n) for n in rule.ours]) for rule in self.rules]
        names = list(our_names)
        present, units, seen = set(names), [], set()
        for name in names:
            unit = None
            for rule, pats in patterns:
                match = next((m for p in pats if (m := p.match(name))), None)
                if match:
                    values = match.groups()
                    unit = Unit(rule, tuple(_bind(n, values) for n in rule.ours),
                                _expand_experts(rule, tuple(_bind(n, values) for n in rule.theirs), cfg, name))
                    break
            if unit is None:
                raise KeyError(f"no conversion rule covers parameter {name!r}")
            if unit.ours in seen:
                continue
            missing = [n for n in unit.ours if n not in present]
            if missing:
                raise KeyError(f"{name!r} is converted together with {missing}, which the model does not have")
            seen.add(unit.ours)
            units.append(unit)
        return units
