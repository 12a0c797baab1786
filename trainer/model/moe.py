"""Mixture of experts: a top-k router over stacked SwiGLU experts (Qwen3-MoE, Mixtral, Qwen2-MoE), single-device.

Parameter names (megatron-core style), experts stacked on dim 0:

    decoder.layers.N.mlp.router.weight                    [E, H]
    decoder.layers.N.mlp.experts.linear_fc1_gate.weight   [E, F, H]
    decoder.layers.N.mlp.experts.linear_fc1_up.weight     [E, F, H]
    decoder.layers.N.mlp.experts.linear_fc2.weight        [E, H, F]
    decoder.layers.N.mlp.shared_experts.{linear_fc1_gate, linear_fc1_up, linear_fc2}.weight, .gate_weight [1, H]

Each maps onto megatron-core's MoELayer by a slice on dim 0 (plus the [gate; up] fusion the dense MLP needs too):
TEGroupedMLP's ``experts.linear_fc1.weight<e>`` = [gate[e]; up[e]] and ``experts.linear_fc2.weight<e>`` = fc2[e],
SequentialMLP's ``experts.local_experts.<e>.linear_fc1.weight`` likewise, ``router.weight`` as is,
SharedExpertMLP's ``shared_experts.linear_fc1.weight`` = [gate; up] and ``.gate_weight``. Stacked experts make
expert parallelism a plain Shard(0) of each tensor, and init draws the whole [E, ...] tensor from its (seed,
name) generator, so a layout that shards experts starts from the same numbers (trainer/model/init.py).

Routing, as transformers' Qwen3MoeTopKRouter / MixtralTopKRouter: logits = x W_r^T, p = softmax(logits) in
fp32, the top k of p, renormalised to sum to 1 unless moe_router_pre_softmax. Dropless by default. The
assignments are sorted by expert (a stable argsort), the tokens gathered in that order, the expert GEMMs run
as torch._grouped_mm over int32 offsets (the cumulative counts), the results gathered back by the inverse
permutation and summed with the router weights. Counts come from scatter_add on the device and every shape is
static (tokens x k rows), so nothing is read back by the host on CUDA. Where _grouped_mm cannot run (dtype,
device, widths not a multiple of 16 bytes, or moe_grouped_gemm=false) a loop over experts does the same
matmuls; it reads the offsets on the host once per layer (a sync on CUDA, free on CPU).

Auxiliary losses. Statistics are per sequence (row r of the global batch) and per MoE layer l, over every slot
of the row (padding included: once one-document rows drop their document ids the model cannot tell padding):

    f[r,l,e] = assignments of row r's tokens to expert e / S      P[r,l,e] = sum over row r's tokens of p_e / S
    aux[r,l] = E * sum_e f[r,l,e] * P[r,l,e]     (Switch Transformer eq. 4-6, HF's scale: k at perfect balance)
    z[r,l]   = mean over row r's tokens of logsumexp(logits)^2                      (ST-MoE router z-loss)

and the training objective gains  moe_aux_loss_coeff * mean_{r,l} aux + moe_z_loss_coeff * mean_{r,l} z, the
mean over the step's rows (trainer.global_batch_size) and the MoE layers. Why per sequence: a layout changes
which tokens share a forward (micro-batch size, data ranks, context-parallel chunks), never which tokens share
a row, so these are sums any layout reproduces exactly: under cp the counts f are all-reduced over the ranks
holding the row and each rank adds its own tokens' part of P (aux is linear in P once f is fixed); under ep
the router runs on the rank's own tokens before dispatch. Global-batch statistics are out of reach with
gradient accumulation (a micro-batch's backward runs before later micro-batches are routed) and micro-batch
statistics would change with parallel.microbatch_size. transformers' load_balancing_loss_func pools f and P
over the whole batch and all layers before multiplying: with one row and one MoE layer it is the same number.

The losses reach the gradients through an identity autograd function on each MoE layer's output whose backward
hands the layer's loss a gradient of 1 (megatron-core's MoEAuxLossAutoScaler): the cross-entropy the step
reports is untouched, and a pipeline stage's layers get their share without the last stage knowing of them.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from trainer.config import ModelConfig
from trainer.model.layers import SwiGLUMLP
from trainer.torch_compat import HAS_GROUPED_MM

# Columns of a layer's router record after its E per-expert assignment counts.
AUX, Z, DROPPED = 0, 1, 2
EXTRA_COLUMNS = 3


class RouterStats:
    """One forward's router records, {MoE layer index: fp64 [counts per expert (E), sum over rows of aux,
    of z, dropped assignments]} (detached), the weight of one row's loss in the objective, and the GEMM path."""

    def __init__(self, num_moe_layers: int, rows_per_step: int, grouped: bool):
        self.records: dict[int, torch.Tensor] = {}
        self.scale = 1.0 / (rows_per_step * num_moe_layers)
        self.grouped = grouped

    def record(self, index: int, values: torch.Tensor) -> None:
        # Overwrites: an activation-checkpoint recompute records the same numbers again, after they were read.
        self.records[index] = values


class _AddLossGradient(torch.autograd.Function):
    """Identity on ``out``; backward gives ``loss`` the gradient 1, as if it were added to the objective."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_like = (loss.shape, loss.dtype, loss.device)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_like
        return grad, torch.ones(shape, dtype=dtype, device=device)


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, topk: int, pre_softmax: bool):
        super().__init__()
        self.topk, self.pre_softmax = topk, pre_softmax
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Set from outside (trainer/lora.py): adapter(module, x) is added to the logits before the softmax.
        self.adapter: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> logits [N, E] (x's dtype), probabilities [N, E] (fp32), top-k weights [N, k] (fp32)
        and expert indices [N, k], highest probability first."""
        logits = F.linear(x, self.weight)
        if self.adapter is not None:
            logits = logits + self.adapter(self, x)
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.topk, dim=-1)
        if not self.pre_softmax:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, probs, top_p, top_i


class GroupedLinear(nn.Module):
    """E linear maps stacked in one weight [E, out, in]: the rows of group e are multiplied by weight[e]^T."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        # Set from outside (trainer/lora.py): adapter(module, x, groups) is added to the output; groups are
        # the int32 offsets (grouped) or the host ends (looped) of this rank's experts.
        self.adapter: Optional[Callable] = None

    def local_weight(self) -> torch.Tensor:
        return local_experts(self.weight)

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # weight[e]^T is a transposed view: the column-major operand _grouped_mm takes without a copy.
        out = torch._grouped_mm(x.to(dtype), self.local_weight().to(dtype).transpose(-2, -1), offs=offsets)
        return out if self.adapter is None else out + self.adapter(self, x.to(dtype), offsets)

    def looped(self, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
        parts, start, weight = [], 0, self.local_weight()
        for e, end in enumerate(ends):
            parts.append(F.linear(x[start:end], weight[e]))
            start = end
        out = torch.cat(parts)
        return out if self.adapter is None else out + self.adapter(self, x, ends)


def local_experts(w: torch.Tensor) -> torch.Tensor:
    """The experts this rank computes of a stacked [E, ...] tensor: all of them, or under expert parallelism
    its Shard(0) of the DTensor. The gradient is this rank's shard of the gradient; along a Replicate mesh axis
    (tp, whose ranks route different tokens under sequence parallelism) it is a partial sum."""
    if not isinstance(w, DTensor):
        return w
    return w.to_local(grad_placements=[Partial() if isinstance(p, Replicate) else p for p in w.placements])


class GroupedExperts(nn.Module):
    """E SwiGLU experts, down(silu(gate(x)) * up(x)), with their weights stacked (see the module docstring)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.linear_fc1_gate = GroupedLinear(num_experts, hidden_size, ffn_hidden_size)
        self.linear_fc1_up = GroupedLinear(num_experts, hidden_size, ffn_hidden_size)
        self.linear_fc2 = GroupedLinear(num_experts, ffn_hidden_size, hidden_size)
        # Expert parallelism sets this (parallel/expert_parallel.py): dispatcher(xs, counts, compute) moves the
        # expert-sorted rows to the ranks holding their experts, runs compute(rows, local counts, host ends or
        # None) there and brings the results back in xs's order. None: every expert is on this rank.
        self.dispatcher: Optional[Callable] = None

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                grouped: bool) -> torch.Tensor:
        """x [N, H], top_i / weights [N, k], counts [E] (assignments per expert) -> sum_j weights[:, j] *
        expert_{top_i[:, j]}(x), [N, H]."""
        n, k = top_i.shape
        order = torch.argsort(top_i.flatten(), stable=True)  # assignments grouped by expert, tokens in order
        xs = x.index_select(0, order // k)
        compute = partial(self.compute, grouped=grouped, dtype=compute_dtype(x))
        ys = compute(xs, counts, None) if self.dispatcher is None else self.dispatcher(xs, counts, compute)
        # A gather by the inverse permutation, not an index_add: deterministic, no atomics on CUDA.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
        y = ys.index_select(0, inverse).view(n, k, -1)
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def compute(self, xs: torch.Tensor, counts: torch.Tensor, host_ends: Optional[list[int]], grouped: bool,
                dtype: torch.dtype) -> torch.Tensor:
        """Rows sorted by (this rank's) expert, counts [local experts] -> each row through its expert. The loop
        needs the group ends on the host: given (a dispatcher read them already) or read here."""
        if grouped:
            offsets = counts.cumsum(0).to(torch.int32)
            gate = self.linear_fc1_gate.grouped(xs, offsets, dtype)
            h = F.silu(gate) * self.linear_fc1_up.grouped(xs, offsets, dtype)
            return self.linear_fc2.grouped(h, offsets, dtype)
        ends = counts.cumsum(0).tolist() if host_ends is None else host_ends
        h = F.silu(self.linear_fc1_gate.looped(xs, ends)) * self.linear_fc1_up.looped(xs, ends)
        return self.linear_fc2.looped(h, ends)


class SharedExperts(SwiGLUMLP):
    """The expert every token goes through (Qwen2-MoE), optionally scaled by sigmoid(x . gate_weight)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, gate: bool):
        super().__init__(hidden_size, ffn_hidden_size)
        if gate:
            self.gate_weight = nn.Parameter(torch.empty(1, hidden_size))
        else:
            self.register_parameter("gate_weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.gate_weight is None else torch.sigmoid(F.linear(x, self.gate_weight)) * out


class MoELayer(nn.Module):
    """Router, routed experts and optional shared experts in place of a layer's dense MLP."""

    def __init__(self, cfg: ModelConfig, moe_index: int):
        super().__init__()
        m = cfg.moe
        self.moe_index, self.num_experts, self.topk = moe_index, m.num_moe_experts, m.moe_router_topk
        self.aux_coeff, self.z_coeff = m.aux_loss_coeff, m.moe_z_loss_coeff
        self.capacity, self.drop_policy = m.capacity, m.moe_drop_policy
        self.router = TopKRouter(cfg.hidden_size, m.num_moe_experts, m.moe_router_topk, m.moe_router_pre_softmax)
        self.experts = GroupedExperts(m.num_moe_experts, cfg.hidden_size, m.expert_ffn(cfg.ffn_hidden_size))
        self.shared_experts: Optional[SharedExperts] = (
            SharedExperts(cfg.hidden_size, m.moe_shared_expert_intermediate_size, m.moe_shared_expert_gate)
            if m.moe_shared_expert_intermediate_size else None)
        self.grouped_gemm = m.moe_grouped_gemm
        # Set by parallel/ when each row's tokens are spread over several ranks (context and sequence
        # parallelism): how many ranks hold a piece of every row, and a function summing a tensor over them.
        self.row_shards = 1
        self.sum_over_row: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor, stats: Optional[RouterStats] = None) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; records this forward's router numbers in ``stats`` and attaches the
        auxiliary losses' gradients (weighted by stats.scale) to the output."""
        B, S, H = x.shape
        E = self.num_experts
        if stats is None:
            width = self.experts.linear_fc2.weight.shape[-1]
            stats = RouterStats(1, B, self.grouped_gemm and grouped_mm_usable(x.device, compute_dtype(x), H, width))
        flat = x.reshape(B * S, H)
        logits, probs, top_p, top_i = self.router(flat)
        rows = torch.arange(B * S, device=x.device) // S
        row_key = (rows.unsqueeze(1) * E + top_i).flatten()  # (row, expert) of every assignment
        row_counts = torch.zeros(B * E, dtype=torch.int64, device=x.device).scatter_add_(
            0, row_key, torch.ones_like(row_key))
        row_len = S * self.row_shards  # tokens of a whole row: the statistics are the row's
        row_total = row_counts if self.sum_over_row is None else self.sum_over_row(row_counts)
        weights, dropped = top_p, torch.zeros((), dtype=torch.float64, device=x.device)
        capacity = self.capacity(row_len)
        if capacity is not None:
            keep = capacity_keep(row_key, top_p.flatten(), row_counts, capacity, self.drop_policy).view_as(top_p)
            weights, dropped = top_p * keep, (~keep).sum().double()
        counts = row_counts.view(B, E).sum(0)
        out = self.experts(flat, top_i, weights.to(logits.dtype), counts, stats.grouped)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        # With the row's counts, each rank's share of aux (linear in P) and z sums to the row's over its ranks.
        aux_rows = switch_aux_rows(probs.view(B, S, E), row_total.view(B, E), row_len)
        z_rows = torch.logsumexp(logits.float(), dim=-1).square().view(B, S).sum(dim=1) / row_len
        aux, z = aux_rows.sum(), z_rows.sum()
        loss = self.aux_coeff * aux + self.z_coeff * z
        if loss.requires_grad and (self.aux_coeff or self.z_coeff):
            out = _AddLossGradient.apply(out, loss * stats.scale)
        stats.record(self.moe_index, torch.cat([counts.double(), aux.detach().double().view(1),
                                                z.detach().double().view(1), dropped.view(1)]))
        return out.view(B, S, H)


def switch_aux_rows(probs: torch.Tensor, counts: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    """Per-row load-balancing loss E * sum_e f_e P_e: probs [B, S, E] (this rank's tokens of each row),
    counts [B, E] (top-k assignments of each whole row's tokens; no gradient), tokens_per_row S (the whole
    row's). Where a row is spread over ranks this is the rank's share; the shares sum to the row's loss."""
    f = counts.to(probs.dtype) / tokens_per_row
    p = probs.sum(dim=1) / tokens_per_row
    return probs.shape[-1] * (f * p).sum(dim=-1)


def capacity_keep(row_key: torch.Tensor, probs: torch.Tensor, group_counts: torch.Tensor, capacity: int,
                  policy: str) -> torch.Tensor:
    """[N*k] bool: the assignment fits its (row, expert) group's capacity. Within a group assignments rank by
    router probability (``probs``: Megatron's default) or by position in the row (``position``)."""
    if policy == "probs":
        by_prob = torch.argsort(probs, descending=True, stable=True)
        order = by_prob[torch.argsort(row_key[by_prob], stable=True)]
    else:
        order = torch.argsort(row_key, stable=True)
    starts = group_counts.cumsum(0) - group_counts
    rank = torch.arange(order.numel(), device=order.device) - starts[row_key[order]]
    return torch.empty_like(order, dtype=torch.bool).scatter_(0, order, rank < capacity)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on (torch._grouped_mm has no autocast rule
    of its own to rely on), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


_GROUPED_MM_WORKS: dict[tuple, bool] = {}


def grouped_mm_usable(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """torch._grouped_mm can run the expert GEMMs: it exists, every row stride (hidden and expert widths) is a
    multiple of 16 bytes, and a tiny problem on this device and dtype runs (once per process: torch 2.13 runs
    fp32 and bf16 on CPU; CUDA's kernel depends on the GPU and dtype). Call it outside compiled code."""
    if not HAS_GROUPED_MM:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    if any(w * size % 16 for w in widths):
        return False
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_WORKS:
        try:  # forward and backward, whatever grad mode or autocast the caller is in
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                x = torch.zeros(4, 16, dtype=dtype, device=device, requires_grad=True)
                w = torch.zeros(2, 16, 16, dtype=dtype, device=device, requires_grad=True)
                offsets = torch.arange(1, 3, dtype=torch.int32, device=device) * 2  # made there: no copy
                out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
                out.backward(torch.ones_like(out))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


# ------------------------------------------------------------------------- the step's router numbers


def start_router_step(modules: list[nn.Module], rows_per_step: int) -> None:
    """Before a training step's first forward: every row's loss weighs 1 / rows_per_step in the objective, and
    the step's router totals start from zero."""
    for m in modules:
        if m.config.moe.enabled:
            m.moe_rows_per_step, m.router_records = rows_per_step, []


def step_router_totals(modules: list[nn.Module], device: torch.device,
                       forwards: Optional[int] = None) -> Optional[torch.Tensor]:
    """This rank's router totals of the step, fp64 flat [MoE layers x (E + 3)] (every stage on a rank adds its
    layers' rows; the rows of layers held elsewhere are zero), or None for a dense model. ``forwards``: count
    only each module's last that many forwards (a pipeline stage's micro-batches: torch's pipelining runs a
    metadata-inference forward on uninitialised input before them on a schedule's first step)."""
    cfg = modules[0].config
    if not cfg.moe.enabled:
        return None
    total = torch.zeros(len(cfg.moe.moe_layers(cfg.num_layers)), cfg.moe.num_moe_experts + EXTRA_COLUMNS,
                        dtype=torch.float64, device=device)
    for m in modules:
        for record in m.router_records[-forwards if forwards else 0:]:
            total += record
    return total.flatten()


def router_metrics(totals: torch.Tensor, cfg: ModelConfig, rows_per_step: int) -> dict[str, float]:
    """The step record's MoE numbers from the reduced totals (host): the mean aux and z losses per row and
    layer (before their coefficients), and the expert load imbalance, max / mean assignments per expert, of
    the worst layer, with that layer's index."""
    layers = cfg.moe.moe_layers(cfg.num_layers)
    E = cfg.moe.num_moe_experts
    t = totals.view(len(layers), E + EXTRA_COLUMNS).double()
    counts = t[:, :E]
    per_layer = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)
    worst = int(per_layer.argmax())
    out = {"moe_aux_loss": float(t[:, E + AUX].sum()) / (len(layers) * rows_per_step),
           "moe_z_loss": float(t[:, E + Z].sum()) / (len(layers) * rows_per_step),
           "moe_load_imbalance": float(per_layer[worst]), "moe_imbalance_layer": layers[worst]}
    if cfg.moe.moe_expert_capacity_factor is not None:
        out["moe_dropped_frac"] = float(t[:, E + DROPPED].sum() / counts.sum().clamp(min=1))
    return out
