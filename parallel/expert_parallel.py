"""Mixture-of-experts layers under parallelism: expert parallelism (EP), and MoE layers whose rows are spread
over context- and sequence-parallel ranks.

Expert parallelism (GShard, Lepikhin et al. 2020; torchtitan's layout). The experts of every MoE layer are split
over an ``ep`` axis carved from the data ranks (dp_shard x cp, parallel/dims.py EP_MESH_AXES): the stacked
[E, ...] weights become DTensors sharded on dim 0 over ep, so rank r of the group holds experts
[r E/ep, (r+1) E/ep) and checkpoints keep the global [E, ...] tensors (DCP reshards them to any ep). FSDP then
shards each rank's experts over the data ranks outside its ep group (dp_shard_mod_ep, and dp_replicate as
HSDP's replica axis). Under tp the experts are Replicate over tp as well (a DTensor on (ep, tp)), each tp rank
computing whole experts for its own tokens, with partial gradients the DTensor sums over tp. The router and
shared experts are sharded like dense weights (over data x tp ranks under tp).

A layer's forward on each rank: route its own tokens (all E router logits, as on one process), sort the
assignments by expert, which groups them by the rank holding that expert, then

    counts  [E]                  -> all_to_all_single: counts [ep sources, E/ep] of the tokens coming here
    rows    [assignments, H]     -> all_to_all_single_autograd (splits: the counts' sums per rank)
    regroup the received rows by local expert (a stable sort: each source's rows keep their order)
    grouped GEMMs over the E/ep local experts
    undo the regrouping          -> all_to_all_single_autograd back (the splits swapped)

and the rows are un-permuted and weighted on the rank that routed them, exactly as on one process. The
all-to-all's backward is the reverse all-to-all, so each expert's gradient sums over every token sent to it by
any rank of the group; FSDP's reduce-scatter adds the other groups'. The split sizes are read on the host once
per layer (all_to_all_single takes them as lists; Megatron's and torchtitan's dropless dispatchers read them
too): one device-to-host sync per MoE layer and micro-batch on CUDA.

Rows spread over ranks. Under context parallelism a row's tokens are on cp ranks, and under sequence
parallelism (tp) the MoE layer sees its rank's S/tp tokens of each row: routing is per token, so each rank
routes its own, and the per-row load-balancing statistics are the row's: the (row, expert) assignment counts
are all-reduced over the ranks holding the row (cp x tp), each rank adds its own tokens' share of P and of the
z-loss, and the shares sum to one process's numbers (trainer/model/moe.py). The router and experts then hold
partial gradients on each tp rank: FSDP's mesh for the MoE layer includes tp, so its reduce-scatter sums them
(and without ep the experts are part of that unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from parallel.dims import ParallelDims
from trainer.model.moe import GroupedExperts, GroupedLinear, MoELayer


def moe_layers(module: nn.Module) -> list[MoELayer]:
    """The MoE layers of a model or pipeline stage (through activation-checkpoint and compile wrappers)."""
    return [m for m in module.modules() if isinstance(m, MoELayer)]


@dataclass
class MoEMeshes:
    """The 1-D (or HSDP 2-D) meshes MoE layers use; None where the layout does not need one."""

    row: Optional[DeviceMesh] = None  # the ranks holding pieces of each row: cp x tp
    ep: Optional[DeviceMesh] = None  # the expert-parallel group
    expert_weights: Optional[DeviceMesh] = None  # the experts' DTensor mesh: ep, or (ep, tp) under tp
    layer: Optional[DeviceMesh] = None  # FSDP of the router and shared experts when tp ranks see different tokens
    experts: Optional[DeviceMesh] = None  # FSDP of the routed experts under expert parallelism


def moe_meshes(mesh: DeviceMesh, dims: ParallelDims) -> MoEMeshes:
    """Flattened views of the run's mesh for its MoE layers. Every rank calls this once, in the same order (a
    view's first use creates its process group)."""
    out = MoEMeshes()
    if dims.cp > 1 or dims.tp > 1:
        out.row = mesh["cp", "tp"]._flatten("cp_tp")
    replicate = ("dp_replicate",) if dims.dp_replicate > 1 else ()
    if dims.tp > 1:
        data_axes = ("dp_shard_mod_ep", "dp_shard_in_ep") if dims.ep_enabled else ("dp_shard",)
        mesh[(*data_axes, "cp", "tp")]._flatten("dp_shard_cp_tp")
        out.layer = mesh[(*replicate, "dp_shard_cp_tp")]
    if dims.ep_enabled:
        out.ep = mesh["ep"]
        # Under tp the experts are Replicate over tp with partial gradients (each tp rank routed its own
        # tokens), which the experts' DTensor sums; an FSDP mesh over (dp_shard_mod_ep, tp) cannot pair with ep
        # (its axes would interleave with ep's).
        out.expert_weights = mesh["ep", "tp"] if dims.tp > 1 else out.ep
        out.experts = mesh[(*replicate, "dp_shard_mod_ep")]
    return out


class AllToAllDispatcher:
    """GroupedExperts.dispatcher under expert parallelism (see the module docstring)."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        self.group = ep_mesh
        self.ep = ep_mesh.size()
        self.local_experts = num_experts // self.ep

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor, Optional[list[int]]], torch.Tensor]) -> torch.Tensor:
        ep, local = self.ep, self.local_experts
        # received[s, j]: rows source s sends for this rank's local expert j.
        received = funcol.wait_tensor(funcol.all_to_all_single(counts.contiguous(), None, None, self.group))
        received = received.view(ep, local)
        local_counts = received.sum(0)
        # The one host read of the layer: split sizes for the all-to-alls and the experts' group ends.
        host = torch.cat([counts.view(ep, local).sum(1), received.sum(1), local_counts.cumsum(0)]).tolist()
        send, recv, ends = host[:ep], host[ep:2 * ep], host[2 * ep:]
        rows = funcol.all_to_all_single_autograd(xs.contiguous(), recv, send, self.group)
        # Received rows come source-major, each source's by expert; the experts want them expert-major.
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(ep),
                                                received.flatten(), output_size=sum(recv))
        order = torch.argsort(expert_of_row, stable=True)
        out = compute(rows.index_select(0, order), local_counts, ends)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return funcol.all_to_all_single_autograd(out.index_select(0, inverse).contiguous(), send, recv,
                                                 self.group)


def apply_expert_parallel(module: nn.Module, ep_mesh: DeviceMesh, weight_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's stacked experts on dim 0 over ``ep_mesh`` (``weight_mesh`` = ep, or (ep, tp)
    with the experts Replicate over tp) and route its tokens there. LoRA's expert adapters (trainer/lora.py,
    [E, ...] like the weights) are sharded alike: each expert's adapter lives with its expert."""
    placements = [Shard(0)] + [Replicate()] * (weight_mesh.ndim - 1)
    for layer in moe_layers(module):
        experts: GroupedExperts = layer.experts
        for linear in (experts.linear_fc1_gate, experts.linear_fc1_up, experts.linear_fc2):
            linear: GroupedLinear
            for name, param in list(linear.named_parameters(recurse=False)):
                # src_data_rank=None: every rank built the same weights (or meta), each keeps its slice.
                sharded = distribute_tensor(param, weight_mesh, placements, src_data_rank=None)
                linear.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.dispatcher = AllToAllDispatcher(ep_mesh, layer.num_experts)


def apply_row_split(module: nn.Module, row_mesh: DeviceMesh) -> None:
    """MoE layers whose rows are spread over ``row_mesh`` (cp x tp): per-row statistics summed over it."""
    shards = row_mesh.size()

    def sum_over_row(t: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", row_mesh))

    for layer in moe_layers(module):
        layer.row_shards, layer.sum_over_row = shards, sum_over_row
