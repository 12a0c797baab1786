"""One training or evaluation step on this rank's share of the mesh.

Every rank draws the same global batch (trainer.global_batch_size rows) and takes its part: the rows of its
data-parallel coordinate, then, under context parallelism, its zigzag chunks of each row. The step's loss
is the summed cross-entropy over every rank's valid tokens divided by the global count of valid tokens,
which every rank computes from the global batch without communication.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from parallel.collectives import sum_tokens_and_ranks
from parallel.parallelize import ParallelModel
from trainer.config import Config
from trainer.flops import real_tokens, step_flops
from trainer.loss import IGNORE_INDEX, DocumentLoss, count_valid, label_index
from trainer.model.moe import router_metrics, start_router_step, step_router_totals
from trainer.step_vector import StepVector

if TYPE_CHECKING:
    from trainer.dpo import PairBatch


def local_batch(batch: dict[str, torch.Tensor], pm: ParallelModel) -> dict[str, torch.Tensor]:
    """This rank's rows (by data-parallel coordinate) and tokens (by context-parallel coordinate), with the
    label_index of their labels (trainer/loss.py: the output layer skips positions whose label is ignored)."""
    from trainer.data.attention_meta import attention_metadata

    dims, mesh = pm.dims, pm.mesh
    rows = batch["input_ids"].shape[0]
    if dims.dp > 1:
        r, per = mesh["batch"].get_local_rank(), rows // dims.dp
        batch = {k: v[r * per:(r + 1) * per] for k, v in batch.items()}
    if "position_ids" not in batch:
        B, S = batch["input_ids"].shape
        batch = {**batch, "position_ids": torch.arange(S).expand(B, S).contiguous()}
    # On the host, before the device copy and the cp split: which attention kernel the rows allow.
    batch = attention_metadata(batch, dims.cp_enabled)
    if dims.cp_enabled:
        from parallel.context_parallel import shard_batch_for_cp

        batch = shard_batch_for_cp(batch, dims.cp, mesh["cp"].get_local_rank())
    # On the host, after the cp split: which of this rank's positions the output layer must run at.
    index = label_index(batch["labels"])
    return batch if index is None else {**batch, "label_index": index}


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From the loader's pinned memory (CUDA) the copy is asynchronous; torch's caching host allocator keeps
    # the pinned block alive until the copy is done, so the host side may drop the batch at once.
    return t.to(device, non_blocking=True)


def model_inputs(mb: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
    keys = ("position_ids", "seq_index", "document_ids", "doc_lens", "label_index")
    kwargs = {k: to_device(mb[k], device) for k in keys if k in mb}
    return to_device(mb["input_ids"], device), kwargs


def loss_context(pm: ParallelModel):
    if pm.dims.tp_enabled:
        from parallel.tensor_parallel import vocab_parallel_loss

        return vocab_parallel_loss(pm.modules[0])
    return contextlib.nullcontext()


def autocast(cfg: Config, pm: ParallelModel, device: torch.device):
    # Under FSDP, bf16 is its mixed-precision policy (bf16 parameters, fp32 reduction) instead. fp8 runs what
    # its Float8Linear layers do not convert in bf16 (parallel/float8.py).
    if cfg.trainer.precision in ("bf16", "fp8") and not pm.dims.fsdp_enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a DTensor's full_tensor: a collective), a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def cp_group(pm: ParallelModel):
    """The context-parallel process group, None without context parallelism."""
    return pm.mesh["cp"].get_group() if pm.dims.cp_enabled else None


def forward_backward(pm: ParallelModel, batch: dict[str, torch.Tensor], normalizer: int, cfg: Config,
                     device: torch.device, doc_loss: Optional[DocumentLoss] = None,
                     pairs: Optional["PairBatch"] = None) -> torch.Tensor:
    """Runs every micro-batch of this rank's batch; returns this rank's summed cross-entropy, or with `pairs`
    (trainer.objective=dpo) the sum of its micro-batches' preference losses (trainer/dpo.py).

    With `doc_loss` and `sample_ids` in the batch, per-document losses are recorded on the way. An MoE model's
    auxiliary losses join the gradients inside its forward (trainer/model/moe.py), averaged over the step's rows.
    """
    start_router_step(pm.modules, cfg.trainer.global_batch_size)
    group = cp_group(pm)
    if pm.runner is not None:
        inputs = {k: to_device(v, device) for k, v in batch.items()}
        pair_loss = None if pairs is None else (lambda t, y, s: pairs.micro_loss(t, y, s, group))
        # The schedule interleaves forwards and backwards, so here autocast also covers the backwards.
        with autocast(cfg, pm, device), loss_context(pm):
            loss = pm.runner.step(inputs, normalizer, doc_loss, pair_loss)
        # The last stage returns sum(CE) / normalizer over its micro-batches; other stages hold no loss.
        scale = 1 if pairs is not None else normalizer
        return _full(loss).detach().float() * scale if loss is not None else torch.zeros((), device=device)
    from parallel.fsdp import set_gradient_sync

    model = pm.modules[0]
    mbs = micro_batches(batch, cfg.parallel.microbatch_size)
    every = cfg.parallel.fsdp_grad_sync == "every_microbatch"
    total = torch.zeros((), device=device)
    for i, mb in enumerate(mbs):
        # every_microbatch: each backward reduce-scatters into the sharded gradients, so no rank ever holds
        # the whole model's unsharded gradients; last_microbatch keeps them until the last backward.
        set_gradient_sync(pm.modules, every or i == len(mbs) - 1)
        tokens, kwargs = model_inputs(mb, device)
        labels = to_device(mb["labels"], device)
        sample_ids = to_device(mb["sample_ids"], device) if "sample_ids" in mb else None
        with loss_context(pm):
            with autocast(cfg, pm, device):
                token_losses = model(tokens, labels=labels, **kwargs)
                ce = token_losses.sum() if pairs is None else pairs.micro_loss(token_losses, labels, sample_ids, group)
            # Outside autocast: backward ops run in the dtypes autocast chose for their forwards (torch AMP
            # docs: "backward passes under autocast are not recommended").
            (ce / normalizer if pairs is None else ce).backward()
        if doc_loss is not None and sample_ids is not None:
            doc_loss.add(token_losses, labels, sample_ids)
        total += _full(ce).detach().float()
    return total


@torch.no_grad()
def forward_doc_losses(pm: ParallelModel, global_batch: dict[str, torch.Tensor], cfg: Config,
                       device: torch.device) -> DocumentLoss:
    """Forward only over this rank's share of a global batch: per-document cross-entropy sums and label counts
    of this rank's tokens (reduce them over the mesh with sum_tokens_and_ranks). The reference log-probs of
    trainer.objective=dpo and its validation come from here."""
    doc_loss = DocumentLoss(global_batch["sample_ids"], device)
    batch = local_batch(global_batch, pm)
    if pm.runner is not None:
        with autocast(cfg, pm, device), loss_context(pm):
            pm.runner.eval_loss_sum({k: to_device(v, device) for k, v in batch.items()}, doc_loss)
        return doc_loss
    for mb in micro_batches(batch, cfg.parallel.microbatch_size):
        tokens, kwargs = model_inputs(mb, device)
        labels = to_device(mb["labels"], device)
        with autocast(cfg, pm, device), loss_context(pm):
            token_losses = pm.modules[0](tokens, labels=labels, **kwargs)
        doc_loss.add(token_losses, labels, to_device(mb["sample_ids"], device))
    return doc_loss


@dataclass(frozen=True)
class BatchFacts:
    """What the host knows of a global batch before its step runs: numpy on the loader's tensors."""

    slots: int
    real_tokens: int  # slots of documents (document id >= 0), not padding (-1)
    normalizer: int  # valid labels: the step's loss divisor
    packing_efficiency: float  # real_tokens / slots
    flops: int  # model FLOPs of the step (trainer/flops.py)


def batch_facts(batch: dict[str, torch.Tensor], cfg: Config, padded_vocab: int) -> BatchFacts:
    labels = batch["labels"].numpy()
    doc_ids = batch["document_ids"].numpy() if "document_ids" in batch else np.zeros(labels.shape, np.int64)
    real = real_tokens(doc_ids)
    valid = int(np.count_nonzero(labels != IGNORE_INDEX))
    return BatchFacts(slots=labels.size, real_tokens=real, normalizer=valid,
                      packing_efficiency=real / labels.size if labels.size else 1.0,
                      flops=step_flops(cfg.model, doc_ids, padded_vocab, labelled=valid))


@dataclass(frozen=True)
class StepTotals:
    """The step's numbers every rank agrees on, on the host."""

    loss_sum: float  # summed cross-entropy over every rank's tokens
    grad_norm: float
    nonfinite_loss_ranks: int  # ranks whose own loss sum was not finite
    preempted: bool  # some rank was signalled
    doc_totals: torch.Tensor  # host [2, documents]: per-document loss sums and token counts over all ranks
    writing_ranks: int = 0  # ranks still writing a pending async checkpoint
    failed_save_ranks: int = 0  # ranks whose pending async checkpoint write failed
    moe: dict = field(default_factory=dict)  # MoE models: aux/z losses and expert load (trainer.model.moe)
    ref_sums: Optional[torch.Tensor] = None  # dpo.reference=online: host [documents], the reference's log-probs


def step_totals(local_sum: torch.Tensor, grad_norm: torch.Tensor, doc_loss: Optional[DocumentLoss],
                signalled: bool, pm: ParallelModel, save_flags: tuple[bool, bool] = (False, False),
                ref_sums: Optional[torch.Tensor] = None) -> StepTotals:
    """The step's one collective and its one device->host transfer (trainer/step_vector.py): the loss sum and
    per-document sums and counts over the mesh's tokens; MoE router totals, the non-finite flag, the preemption
    flag and the async-save flags (still writing, failed) summed over ranks; the (already global) grad norm."""
    device = local_sum.device
    v = StepVector(device)
    v.tokens("loss_sum", local_sum.view(1))
    if doc_loss is not None:
        v.tokens("doc_sums", doc_loss.sums)
        v.tokens("doc_counts", doc_loss.counts)
    if ref_sums is not None:  # dpo.reference=online: the reference's per-document log-prob sums
        v.tokens("ref_sums", ref_sums.double())
    # Router totals are per rank: under sequence parallelism each tp rank routed its own part of the rows.
    router = step_router_totals(pm.modules, device, pm.runner.n_microbatches if pm.runner is not None else None)
    if router is not None:
        v.ranks("router", router)
    v.ranks("nonfinite_loss", ~torch.isfinite(local_sum.detach()).view(1))
    writing, failed = save_flags
    v.rank_flags(preempted=signalled, writing=writing, failed_save=failed)
    host = v.reduce(pm.mesh, grad_norm=grad_norm)
    k = len(doc_loss.keys) if doc_loss is not None else 0
    docs = (torch.stack([host.tensor("doc_sums"), host.tensor("doc_counts")]) if doc_loss is not None
            else host.host.new_zeros(2, 0))
    # Per row of the step: the rows forward_backward gave the model (start_router_step) weigh its aux losses.
    moe = ({} if router is None else router_metrics(host.tensor("router"), pm.modules[0].config,
                                                    pm.modules[0].moe_rows_per_step or 1))
    return StepTotals(loss_sum=host.value("loss_sum"), grad_norm=host.value("grad_norm"),
                      nonfinite_loss_ranks=int(host.value("nonfinite_loss")), preempted=host.value("preempted") > 0,
                      doc_totals=docs.view(2, k), writing_ranks=int(host.value("writing")),
                      failed_save_ranks=int(host.value("failed_save")), moe=moe,
                      ref_sums=host.tensor("ref_sums") if ref_sums is not None else None)


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
            total += _full(out).float() if out is not None else 0.0
            continue
        for mb in micro_batches(batch, cfg.parallel.microbatch_size):
            tokens, kwargs = model_inputs(mb, device)
            with autocast(cfg, pm, device), loss_context(pm):
                total += pm.modules[0](tokens, labels=mb["labels"].to(device), **kwargs).sum()
    pm.train(True)
    return float(sum_tokens_and_ranks(total.view(1), total.new_zeros(0), pm.mesh)[0]) / max(valid, 1)
