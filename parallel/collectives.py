"""The step's sums over the whole mesh (one collective) and the mesh-wide gradient norm: numbers every rank
must agree on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.torch_compat import clip_grads_with_norm_


def mesh_group(mesh):
    """The process group of every rank of the mesh: the world's (build_mesh spans it), checked."""
    if mesh.size() != dist.get_world_size():
        raise RuntimeError(f"the mesh has {mesh.size()} ranks but the world {dist.get_world_size()}; "
                           f"one-collective sums need a mesh over the whole world")
    return dist.group.WORLD


def sum_tokens_and_ranks(token_part: torch.Tensor, rank_part: torch.Tensor, mesh) -> torch.Tensor:
    """One all-reduce SUM over the whole mesh of [token_part, rank_part] (1-D, one dtype).

    token_part holds sums over this rank's tokens (losses, per-document sums and counts): tp ranks hold the
    same tokens, so only tp rank 0 contributes them, and the result equals a sum over the token axes (dp, cp,
    pp). rank_part holds per-rank numbers (flags) that every rank contributes. One collective over the flat
    group instead of one per mesh axis: the step's numbers cost one latency, not four.
    """
    if mesh is not None and mesh["tp"].get_local_rank() != 0:
        token_part = torch.zeros_like(token_part)
    both = torch.cat([token_part, rank_part])
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=mesh_group(mesh))
    return both


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
        # A non-finite norm would scale every gradient to NaN; such a step is skipped anyway, so clip by a
        # finite stand-in instead (a device-side choice, no host sync), which keeps each rank's gradients
        # as bad or good as they were for the report of which ranks went non-finite.
        finite = torch.where(torch.isfinite(total), total, torch.full_like(total, max_norm))
        # One foreach multiply per mesh: a foreach op takes DTensors of one mesh only (MoE layers' gradients
        # live on their own FSDP meshes, parallel/expert_parallel.py).
        by_mesh: dict[object, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        for group in by_mesh.values():
            clip_grads_with_norm_(group, max_norm, finite)
    return total


class _SumOfParts(torch.autograd.Function):
    """Forward: all-reduce SUM over ``group``. Backward: the incoming gradient, unchanged.

    For a sum s = sum_r x_r of parts held by the ranks of ``group`` (a sequence's log-prob over its context-parallel
    chunks) that every rank then feeds into the same loss L(s), rank r's share of dL/dtheta is dL/ds * dx_r/dtheta:
    the gradient for x_r is dL/ds itself. The ranks' parameter gradients are then summed by the data-parallel
    reduction like any token loss's, giving one process' gradient. (torch.distributed.nn.functional.all_reduce
    all-reduces the gradient too, which would count it once per rank.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_of_parts(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over ``group`` with the gradient of a sum of parts (see _SumOfParts); as is without a group."""
    return x if group is None else _SumOfParts.apply(x, group)
