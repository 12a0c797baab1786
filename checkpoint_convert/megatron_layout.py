"""Where each tensor of a Megatron-LM legacy checkpoint lies over TP x PP x EP, on full (unsharded) tensors named
by the Megatron table (checkpoint_convert.models.megatron_names): which pipeline stage and expert-parallel rank
hold it under which name, and each TP rank's part of it. Used by checkpoint_convert.megatron in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from checkpoint_convert.hf import pad_vocab_rows
from checkpoint_convert.mapping import Unit
from checkpoint_convert.megatron_common import Ours
from checkpoint_convert.models.megatron_names import (COLUMN, GATED_COLUMN, REPLICATED, ROW, VOCAB, expert_of,
                                                      has_extra_state, layer_of, megatron_units, tp_split)
from trainer.config import ModelConfig

__all__ = ["Placed", "plan", "shard", "merge", "stage_tensors"]


@dataclasses.dataclass(frozen=True)
class Placed:
    """A Megatron-table unit on one pipeline stage: its global Megatron names -> (expert-parallel rank holding it,
    None for every rank; its name in that stage's files)."""

    unit: Unit
    names: dict[str, tuple[Optional[int], str]]


def plan(spec: str, stage_layers: list[int], shapes: dict[str, torch.Tensor], cfg: ModelConfig, ep: int = 1,
         experts: Optional[str] = None) -> list[list[Placed]]:
    """Which Megatron tensors each pipeline stage holds, under which local names (`shapes`: the model's
    meshtron parameters, from :func:`checkpoint_convert.megatron_common.meshtron_shapes`; `experts`: the expert
    names, megatron_names.EXPERTS' key, default the spec's).

    Layers are numbered from 0 on every stage; the embedding lives on the first stage, the final norm and
    output layer on the last. With tied embeddings and PP > 1 megatron-core's last stage still registers
    output_layer.weight (a copy kept equal to the embedding through the embedding group), so it is written
    there from the embedding; with PP = 1 there is no output_layer.weight at all. Expert e lies on EP rank
    e // (E / EP) as local expert e % (E / EP); every other tensor on every EP rank.
    """
    starts = [sum(stage_layers[:s]) for s in range(len(stage_layers))]
    last = len(stage_layers) - 1
    stages: list[list[Placed]] = [[] for _ in stage_layers]
    per_rank = cfg.moe.num_moe_experts // ep if cfg.moe.enabled else 0
    units = megatron_units(shapes, cfg, spec, experts)
    for unit in units:
        layer = layer_of(unit.theirs[0])
        if layer is None:
            s = 0 if unit.theirs[0].startswith("embedding.") else last
            stages[s].append(Placed(unit, {n: (None, n) for n in unit.theirs}))
            continue
        s = max(i for i, start in enumerate(starts) if layer[0] >= start and stage_layers[i])
        names = {}
        for n in unit.theirs:
            local = f"decoder.layers.{layer[0] - starts[s]}.{layer_of(n)[1]}"
            expert = expert_of(local)
            names[n] = (None, local) if expert is None else (expert[0] // per_rank, expert[1](expert[0] % per_rank))
        stages[s].append(Placed(unit, names))
    if "output_layer.weight" not in shapes and last > 0:  # tied embeddings
        emb = next(u for u in units if u.theirs == ("embedding.word_embeddings.weight",))
        stages[last].append(Placed(emb, {"embedding.word_embeddings.weight": (None, "output_layer.weight")}))
    return stages


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s part of a full Megatron tensor (megatron-core's Column/RowParallelLinear layout)."""
    kind = tp_split(name)
    if tp == 1 or kind == REPLICATED:
        part = full
    elif kind in (COLUMN, VOCAB, ROW):
        dim = 1 if kind == ROW else 0
        if full.shape[dim] % tp:
            raise ValueError(f"{name} {list(full.shape)}: dim {dim} does not split into {tp} equal parts")
        part = full.chunk(tp, dim)[rank]
    else:  # GATED_COLUMN: [gate; up] -> [gate_r; up_r], so each rank's SwiGLU pairs its own halves
        gate, up = full.chunk(2, 0)
        part = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    # Own storage: torch.save would otherwise write the whole tensor a slice views.
    return part.clone(memory_format=torch.contiguous_format)


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` over all TP ranks."""
    kind = tp_split(name)
    if len(shards) == 1 or kind == REPLICATED:
        return shards[0]
    if kind == GATED_COLUMN:
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=1 if kind == ROW else 0)


def stage_tensors(placed: list[Placed], ours: Ours, cfg: ModelConfig, tp: int, padded: int, last: bool
                  ) -> Iterator[tuple[Optional[int], str, list]]:
    """(EP rank or None for every one, name in the stage's files, [TP rank 0's tensor, ...]) in file order, None
    for `_extra_state` entries; each full tensor converted once for all TP ranks."""
    for p in placed:
        full = p.unit.convert_to_theirs([ours.take(n) for n in p.unit.ours], cfg)
        for name, (ep_rank, local) in p.names.items():
            t = full.pop(name)
            t = pad_vocab_rows(name, t, torch.Size([padded, *t.shape[1:]]))
            yield ep_rank, local, [shard(name, t, tp, r) for r in range(tp)]
            del t
            module = local.rsplit(".", 1)[0]
            if has_extra_state(module):
                yield ep_rank, f"{module}._extra_state", [None] * tp
        del full
    if last:  # megatron-core's output layer has its extra state even when tied (and then weightless)
        yield None, "output_layer._extra_state", [None] * tp
