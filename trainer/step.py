"""One training or evaluation step on this rank's share of the mesh.

Every rank draws the same global batch (trainer.global_batch_size rows) and takes its part: the rows of its
data-parallel coordinate, then, under context parallelism, its zigzag chunks of each row. The step's loss
is the summed cross-entropy over every rank's valid tokens divided by the global count of valid tokens,
which every rank computes from the global batch without communication.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from parallel.collectives import sum_over
from parallel.parallelize import ParallelModel
from trainer.config import Config
from trainer.loss import DocumentLoss, count_valid

# Axes whose ranks hold different tokens: their loss sums add up. tp ranks hold the same tokens.
TOKEN_AXES = ("dp_replicate", "dp_shard", "cp", "pp")


def local_batch(batch: dict[str, torch.Tensor], pm: ParallelModel) -> dict[str, torch.Tensor]:
    """This rank's rows (by data-parallel coordinate) and tokens (by context-parallel coordinate)."""
    dims, mesh = pm.dims, pm.mesh
    rows = batch["input_ids"].shape[0]
    if dims.dp > 1:
        r, per = mesh["batch"].get_local_rank(), rows // dims.dp
        batch = {k: v[r * per:(r + 1) * per] for k, v in batch.items()}
    if "position_ids" not in batch:
        B, S = batch["input_ids"].shape
        batch = {**batch, "position_ids": torch.arange(S).expand(B, S).contiguous()}
    if dims.cp_enabled:
        from parallel.context_parallel import shard_batch_for_cp

        batch = shard_batch_for_cp(batch, dims.cp, mesh["cp"].get_local_rank())
    return batch


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def model_inputs(mb: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
    kwargs = {k: mb[k].to(device) for k in ("position_ids", "seq_index", "document_ids", "doc_lens") if k in mb}
    return mb["input_ids"].to(device), kwargs


def loss_context(pm: ParallelModel):
    if pm.dims.tp_enabled:
        from parallel.tensor_parallel import loss_context as tp_loss_context

        return tp_loss_context(pm.modules[0])
    return contextlib.nullcontext()


def autocast(cfg: Config, pm: ParallelModel, device: torch.device):
    # Under FSDP, bf16 is its mixed-precision policy (bf16 parameters, fp32 reduction) instead.
    if cfg.trainer.precision == "bf16" and not pm.dims.fsdp_enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _as_local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def forward_backward(pm: ParallelModel, batch: dict[str, torch.Tensor], normalizer: int, cfg: Config,
                     device: torch.device, doc_loss: Optional[DocumentLoss] = None) -> torch.Tensor:
    """Runs every micro-batch of this rank's batch; returns this rank's summed cross-entropy.

    With `doc_loss` and `sample_ids` in the batch, per-document losses are recorded on the way.
    """
    if pm.runner is not None:
        inputs = {k: v.to(device) for k, v in batch.items()}
        with autocast(cfg, pm, device), loss_context(pm):
            loss = pm.runner.step(inputs, normalizer, doc_loss)
        # The last stage returns sum(CE) / normalizer over its micro-batches; other stages hold no loss.
        return _as_local(loss).detach().float() * normalizer if loss is not None else torch.zeros((), device=device)
    from parallel.fsdp import set_gradient_sync

    model = pm.modules[0]
    mbs = micro_batches(batch, cfg.parallel.microbatch_size)
    total = torch.zeros((), device=device)
    for i, mb in enumerate(mbs):
        set_gradient_sync(pm.modules, i == len(mbs) - 1)
        tokens, kwargs = model_inputs(mb, device)
        labels = mb["labels"].to(device)
        with autocast(cfg, pm, device), loss_context(pm):
            token_losses = model(tokens, labels=labels, **kwargs)
            ce = token_losses.sum()
            (ce / normalizer).backward()
        if doc_loss is not None and "sample_ids" in mb:
            doc_loss.add(token_losses, labels, mb["sample_ids"].to(device))
        total += _as_local(ce).detach().float()
    return total


def packing_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Share of the global batch's slots that hold real tokens (padding has document id -1)."""
    if "document_ids" not in batch:
        return 1.0
    return float((batch["document_ids"] >= 0).float().mean())


def reduce_tokens(pm: ParallelModel):
    """A function summing a tensor over the ranks that hold different tokens (for DocumentLoss.value)."""
    return lambda t: sum_over(t, pm.mesh, TOKEN_AXES)


def global_loss(local_sum: torch.Tensor, normalizer: int, pm: ParallelModel) -> float:
    return float(sum_over(local_sum.clone(), pm.mesh, TOKEN_AXES)) / normalizer


@torch.no_grad()
def evaluate(pm: ParallelModel, global_batches: list[dict[str, torch.Tensor]], cfg: Config,
             device: torch.device) -> float:
    """Mean token loss over the validation batches (each a global batch, split like training)."""
    pm.train(False)
    total, valid = torch.zeros((), device=device), 0
    for gb in global_batches:
        valid += count_valid(gb["labels"])
        batch = local_batch(gb, pm)
        if pm.runner is not None:
            with autocast(cfg, pm, device), loss_context(pm):
                out: Optional[torch.Tensor] = pm.runner.eval_loss_sum({k: v.to(device) for k, v in batch.items()})
            total += _as_local(out).float() if out is not None else 0.0
            continue
        for mb in micro_batches(batch, cfg.parallel.microbatch_size):
            tokens, kwargs = model_inputs(mb, device)
            with autocast(cfg, pm, device), loss_context(pm):
                total += pm.modules[0](tokens, labels=mb["labels"].to(device), **kwargs).sum()
    pm.train(True)
    return float(sum_over(total, pm.mesh, TOKEN_AXES)) / max(valid, 1)
