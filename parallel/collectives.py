"""Sums over named mesh axes and the mesh-wide gradient norm: numbers every rank must agree on."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def _groups(mesh, axes: Sequence[str]):
    return [mesh[a].get_group() for a in axes if mesh is not None and mesh[a].size() > 1]


def sum_over(value: torch.Tensor, mesh, axes: Sequence[str]) -> torch.Tensor:
    """In-place all-reduce SUM of a tensor over each named axis in turn (a no-op without a mesh)."""
    for group in _groups(mesh, axes):
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, mesh=None,
                    exclude: frozenset | set = frozenset()) -> torch.Tensor:
    """Gradient-norm clipping over the whole mesh: FSDP and TP shards (through DTensor), pipeline stages
    (an all-reduce over pp), each parameter counted once (`exclude` holds the pipeline's copy of tied
    embeddings). Returns the global norm; clips only when max_norm is finite."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None and p not in exclude]
    # DTensors on one mesh with one layout reduce together; plain tensors are local to this rank.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device if grads else None
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq += norm.float() ** 2
    if mesh is not None and mesh["pp"].size() > 1:
        dist.all_reduce(sq, group=mesh["pp"].get_group())
    total = sq.sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total
