"""Pipeline parallelism: split GPTModel into stages by layer and drive torch.distributed.pipelining.

Stages are copies of the whole model with parts removed, never new module types, so every stage's
state_dict keeps the original FQNs (``decoder.layers.5...`` stays layer 5 on whichever rank holds it) and
checkpoints never depend on the pipeline layout. Placement follows torch's schedules:

    loop (gpipe, 1f1b, interleaved_1f1b, interleaved_zb): rank r holds stages r, r + pp, r + 2*pp, ...
    V    (zbv):                                            rank r holds stages r and 2*pp - 1 - r

Tied embeddings across stages follow Megatron: the last stage holds its own copy of the embedding as
``output_layer.weight``; after backward both copies receive the sum of their gradients
(:func:`tied_embedding_grad_sync`), so they stay equal after every optimizer step.

The schedules are torch's own (checked on torch 2.11 and 2.13, CPU/gloo): GPipe, 1F1B, Interleaved 1F1B,
Interleaved Zero Bubble (ZB1P, loop placement) and ZB-V (V placement); each trains and evaluates
(forward only, ``schedule.eval``) with results equal to a single-process run.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError
from trainer.loss import DocumentLoss
from trainer.model.gpt import GPTModel
from trainer.torch_compat import forget_pipeline_forward_setup, pipeline_stage_class

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
# Schedules that drive exactly one stage per rank; the others take a list of stages.
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
# Schedules whose stages sit in a V (rank r: r and 2*pp-1-r) instead of a loop.
V_SCHEDULES = ("zbv",)

# The last stage's copy of tied embeddings: in its state_dict, but not a parameter of the original model.
TIED_COPY_FQN = "output_layer.weight"
EMBEDDING_FQN = "embedding.word_embeddings.weight"

# Keyword inputs that every stage receives (attention layout and rotary positions; the last stage's label
# positions, trainer/loss.py label_index), split like input_ids.
STAGE_KWARGS = ("position_ids", "seq_index", "document_ids", "doc_lens", "label_index")


# ------------------------------------------------------------------------------------------ layout


def check_pp_divisibility(num_layers: int, pp: int, virtual_stages: int, schedule: str,
                          n_microbatches: Optional[int] = None) -> None:
    """Refuse a pipeline layout before any process group starts; messages name the values involved."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline schedule {schedule!r} is not supported; expected one of {list(SCHEDULES)}")
    if pp < 1 or virtual_stages < 1:
        raise ConfigError(f"pp={pp} and virtual_stages={virtual_stages} must both be >= 1")
    if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ConfigError(f"pipeline schedule {schedule!r} runs one stage per rank: virtual_stages="
                          f"{virtual_stages} must be 1 (use interleaved_1f1b, interleaved_zb or zbv for more)")
    if schedule in V_SCHEDULES and virtual_stages != 2:
        raise ConfigError(f"pipeline schedule {schedule!r} places exactly two stages per rank in a V: "
                          f"virtual_stages={virtual_stages} must be 2")
    if schedule not in SINGLE_STAGE_SCHEDULES and virtual_stages < 2:
        raise ConfigError(f"pipeline schedule {schedule!r} interleaves several stages per rank: "
                          f"virtual_stages={virtual_stages} must be >= 2 (use gpipe or 1f1b for one)")
    _check_layers(num_layers, pp, virtual_stages)
    if n_microbatches is not None:
        _check_microbatches(n_microbatches, pp, virtual_stages, schedule)


def _check_layers(num_layers: int, pp: int, virtual_stages: int) -> None:
    if num_layers % (pp * virtual_stages):
        raise ConfigError(
            f"model.num_layers={num_layers} is not divisible by pp x virtual_stages = {pp} x {virtual_stages} = "
            f"{pp * virtual_stages}; every pipeline stage must hold the same number of layers"
        )


def _check_microbatches(n_microbatches: int, pp: int, virtual_stages: int, schedule: str) -> None:
    # The same conditions torch's schedule constructors check, raised here before anything starts.
    if schedule == "1f1b" and n_microbatches < pp:
        raise ConfigError(f"1f1b needs at least as many microbatches as stages: n_microbatches={n_microbatches}"
                          f" < pp={pp}")
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(f"{schedule} needs n_microbatches={n_microbatches} to be a multiple of its rounds "
                              f"max(1, n_microbatches // pp={pp}) = {rounds}; a multiple of pp always works")


def stage_layer_ranges(num_layers: int, pp: int, virtual_stages: int) -> list[range]:
    """Global layer indices of each stage, contiguous and of equal size, in stage order."""
    _check_layers(num_layers, pp, virtual_stages)
    per_stage = num_layers // (pp * virtual_stages)
    return [range(s * per_stage, (s + 1) * per_stage) for s in range(pp * virtual_stages)]


def stage_ids_for_rank(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages a pipeline rank holds, in increasing order (the order torch's schedules expect)."""
    if schedule in V_SCHEDULES:
        # The V keeps stage 0 and the last stage on rank 0, so the loss never travels back to rank 0.
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


# ------------------------------------------------------------------------------------------- split


def build_stage_modules(model: GPTModel, pp_rank: int, pp: int, virtual_stages: int,
                        schedule: str) -> list[tuple[int, GPTModel]]:
    """(stage index, stage module) for each stage this rank holds; ``model`` is left untouched.

    Pass a model built on the meta device for real sizes (then ``to_empty`` + ``init_weights(seed)`` each
    stage); a CPU model works too and its weights are copied.
    """
    check_pp_divisibility(model.config.num_layers, pp, virtual_stages, schedule)
    ranges = stage_layer_ranges(model.config.num_layers, pp, virtual_stages)
    last = pp * virtual_stages - 1
    return [(s, _build_stage(model, ranges[s], is_first=s == 0, is_last=s == last))
            for s in stage_ids_for_rank(pp_rank, pp, virtual_stages, schedule)]


def _build_stage(model: GPTModel, layers: range, is_first: bool, is_last: bool) -> GPTModel:
    dropped: list[Optional[nn.Module]] = [m for k, m in model.decoder.layers.items() if int(k) not in layers]
    if not is_first:
        dropped.append(model.embedding)
    if not is_last:
        dropped += [model.decoder.final_layernorm, model.output_layer]
    # Mapping dropped submodules to None in deepcopy's memo means their weights are never copied.
    stage = copy.deepcopy(model, memo={id(m): None for m in dropped if m is not None})
    for key in [k for k, m in stage.decoder.layers.items() if m is None]:
        del stage.decoder.layers[key]
    if is_last and not is_first and model.config.tie_word_embeddings:
        stage.output_layer = _tied_copy(model.embedding.word_embeddings.weight)
    return stage


def _tied_copy(embedding: torch.Tensor) -> nn.Linear:
    """An output layer holding a copy of the embedding. On the meta device it stays empty: init_weights
    draws ``output_layer.weight`` of a tied model from the embedding's generator, so it starts equal."""
    vocab, hidden = embedding.shape
    linear = nn.Linear(hidden, vocab, bias=False, device=embedding.device, dtype=embedding.dtype)
    if not embedding.is_meta:
        with torch.no_grad():
            linear.weight.copy_(embedding)
    return linear


def has_tied_copy(stage: GPTModel) -> bool:
    """True for a last stage that holds its own copy of tied embeddings (a tied model has no output_layer)."""
    return stage.config.tie_word_embeddings and stage.output_layer is not None


def duplicate_params(stage_modules: list[tuple[int, GPTModel]]) -> set[nn.Parameter]:
    """The tied copies: gradient-norm clipping must count them once, not twice (they hold the same grad)."""
    return {m.output_layer.weight for _, m in stage_modules if has_tied_copy(m)}


# ---------------------------------------------------------------------------------- tied embeddings


def tied_embedding_grad_sync(stage_modules: list[tuple[int, GPTModel]], pp_mesh: DeviceMesh) -> None:
    """Megatron's embedding-group all-reduce: both copies of tied embeddings get the sum of their grads.

    Stage 0 always lives on pp rank 0; the last stage on pp rank pp-1 (loop) or also on rank 0 (V, or one
    pipeline rank with virtual stages). Only those two ranks exchange, by send/recv, so the other pipeline
    ranks need not know the embedding's shape. DTensor grads are exchanged as their local shards: tp and
    fsdp shard both copies identically.
    """
    embedding = next((m.embedding.word_embeddings.weight for _, m in stage_modules
                      if m.embedding is not None and _tied_across_stages(m)), None)
    copy_ = next((m.output_layer.weight for _, m in stage_modules if has_tied_copy(m)), None)
    if embedding is not None and copy_ is not None:  # V placement, or one pipeline rank with virtual stages
        total = _local_grad(embedding) + _local_grad(copy_)
        _local_grad(embedding).copy_(total)
        _local_grad(copy_).copy_(total)
    elif embedding is not None:
        _exchange_add(_local_grad(embedding), peer=pp_mesh.size() - 1, group=pp_mesh.get_group())
    elif copy_ is not None:
        _exchange_add(_local_grad(copy_), peer=0, group=pp_mesh.get_group())


def _tied_across_stages(first_stage: GPTModel) -> bool:
    # Without a final norm the first stage is not also the last, so the logits use a copy elsewhere.
    return first_stage.config.tie_word_embeddings and first_stage.decoder.final_layernorm is None


def _local_grad(param: nn.Parameter) -> torch.Tensor:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    grad = param.grad
    if isinstance(grad, DTensor):
        # Without FSDP, tensor parallelism can leave a gradient in another layout than its parameter (the
        # vocab-parallel embedding's comes back Replicate, the output copy's Shard(0)): bring both to the
        # parameter's layout so the two ranks exchange local shards of the same shape.
        if tuple(grad.placements) != tuple(param.placements):
            param.grad = grad = grad.redistribute(param.device_mesh, param.placements)
        return grad.to_local()
    return grad


def _exchange_add(grad: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    # Both sides compute mine + theirs; float addition commutes, so the two copies stay bitwise equal.
    outgoing = grad.detach().contiguous().clone()
    incoming = torch.empty_like(outgoing)
    ops = [dist.P2POp(dist.isend, outgoing, group=group, group_peer=peer),
           dist.P2POp(dist.irecv, incoming, group=group, group_peer=peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    grad.add_(incoming)


# ------------------------------------------------------------------------------------------ runner


class PipelineRunner:
    """Builds torch's PipelineStages and schedule for this rank's stages and runs one step at a time.

    Loss per microbatch is summed cross-entropy divided by ``normalizer`` (the global count of valid tokens
    of the step), so gradients are already normalised: the schedule is built with scale_grads=False and
    never divides them again by the number of microbatches.
    """

    def __init__(self, stage_modules: list[tuple[int, GPTModel]], pp_mesh: DeviceMesh, schedule_name: str,
                 n_microbatches: int, device: torch.device):
        if schedule_name not in SCHEDULES:
            raise ConfigError(f"pipeline schedule {schedule_name!r} is not supported; "
                              f"expected one of {list(SCHEDULES)}")
        num_stages = pp_mesh.size() * len(stage_modules)
        group = pp_mesh.get_group()
        stage_cls = pipeline_stage_class()
        self.stages = [stage_cls(m, s, num_stages, device, group=group) for s, m in stage_modules]
        self.has_first = any(stage.is_first for stage in self.stages)
        self.has_last = any(stage.is_last for stage in self.stages)
        self.normalizer = 1.0
        # trainer.objective=dpo: (token losses, labels, sample ids) -> the micro-batch's loss; see step().
        self.pair_loss: Optional[Any] = None
        self._trained = False  # a training step has run (see eval_loss_sum)
        self.n_microbatches = n_microbatches
        # (token losses, labels, sample ids) of each loss_fn call of the running step; see step().
        self._doc_parts: Optional[list] = None
        # Multi-stage schedules run a per-rank action plan; see _forward_actions_only for why eval edits it.
        self.has_action_plan = schedule_name not in SINGLE_STAGE_SCHEDULES
        schedule_cls = SCHEDULES[schedule_name]
        stages: Any = self.stages[0] if schedule_name in SINGLE_STAGE_SCHEDULES else self.stages
        self.schedule = schedule_cls(stages, n_microbatches=n_microbatches, loss_fn=self._loss_fn,
                                     scale_grads=False)

    def _loss_fn(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage returns per-token losses (its labels came in as a stage kwarg, so the output layer
        and cross-entropy run chunked inside the stage's forward); this sums and normalises them."""
        if self._doc_parts is not None:
            # The target carries [labels, sample_ids] so per-document losses can be recorded per micro-batch.
            labels, sample_ids = target.unbind(-1)
            self._doc_parts.append((tokens.detach(), labels, sample_ids))
            if self.pair_loss is not None:  # trainer.objective=dpo: the micro-batch's pairs (trainer/dpo.py)
                return self.pair_loss(tokens, labels, sample_ids)
        return tokens.sum() / self.normalizer

    def _inputs(self, batch: dict) -> tuple[tuple, dict, dict]:
        """Positional args (first stage only), model kwargs (every stage), schedule kwargs (last stage)."""
        args = (batch["input_ids"],) if self.has_first else ()
        kwargs = {k: batch[k] for k in STAGE_KWARGS if batch.get(k) is not None}
        # Every stage receives the labels; only the last one (which has the output layer) uses them.
        kwargs["labels"] = batch["labels"]
        losses: Optional[list] = [] if self.has_last else None
        target = batch["labels"]
        if self._doc_parts is not None:
            target = torch.stack([batch["labels"], batch["sample_ids"]], dim=-1)
        extra = {"target": target, "losses": losses} if self.has_last else {}
        return args, kwargs, extra

    def step(self, batch: dict, normalizer: float, doc_loss: Optional[DocumentLoss] = None,
             pair_loss: Optional[Any] = None) -> Optional[torch.Tensor]:
        """Forward and backward over all microbatches; gradients accumulate into the stage parameters.

        Returns sum over microbatches of (summed CE / normalizer) on the rank with the last stage, else None.
        With `doc_loss` (and `sample_ids` in the batch), the last stage records per-document losses in it.
        With `pair_loss` (needs both), each micro-batch's loss is pair_loss(token losses, labels, sample ids).
        """
        if pair_loss is not None and (doc_loss is None or "sample_ids" not in batch):
            raise ValueError("pair_loss needs doc_loss and the batch's sample_ids")
        self.normalizer = float(normalizer)
        self.pair_loss = pair_loss
        self._trained = True
        self._doc_parts = [] if doc_loss is not None and "sample_ids" in batch else None
        args, kwargs, extra = self._inputs(batch)
        try:
            self.schedule.step(*args, return_outputs=False, **extra, **kwargs)
            if self._doc_parts is not None:
                # torch (2.13) (re)initialises the stages on a schedule's first step and after each eval with a
                # shape-inference pass that runs loss_fn on uninitialised input before the real micro-batches:
                # only the last n_microbatches calls are this step's.
                for part in self._doc_parts[-self.n_microbatches:]:
                    doc_loss.add(*part)
        finally:
            self._doc_parts = None
            self.pair_loss = None
        return torch.stack(extra["losses"]).sum().detach() if self.has_last else None

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict, doc_loss: Optional[DocumentLoss] = None) -> Optional[torch.Tensor]:
        """Forward only (torch's ``schedule.eval``): summed CE over the batch on the last stage, else None;
        with `doc_loss`, the last stage records per-document losses in it as step() does."""
        self.normalizer = 1.0
        self._doc_parts = [] if doc_loss is not None else None
        try:
            args, kwargs, extra = self._inputs(batch)
            plan = _forward_actions_only(self.schedule) if self.has_action_plan else contextlib.nullcontext()
            with plan:
                self.schedule.eval(*args, return_outputs=False, **extra, **kwargs)
            if not self._trained:  # the set-up was made without a backward: the first step must redo it
                forget_pipeline_forward_setup(self.schedule)
            if self._doc_parts is not None:
                for part in self._doc_parts[-self.n_microbatches:]:
                    doc_loss.add(*part)
        finally:
            self._doc_parts = None
        return torch.stack(extra["losses"]).sum() if self.has_last else None


# Actions a forward-only pass needs; FSDP's unshard/reshard stay so sharded stages still gather weights.
_FORWARD_ACTIONS = frozenset({"F", "SEND_F", "RECV_F", "UNSHARD", "RESHARD"})


@contextlib.contextmanager
def _forward_actions_only(schedule: Any):
    """Run a runtime schedule's plan with its backward actions removed.

    torch 2.13's ``eval()`` keeps the backward actions and relies on each being a no-op without backward,
    but where a stage's previous stage sits on the same rank (ZBV's V, or a single pipeline rank with
    virtual stages) a backward action still hands its input gradient over locally and fails ("can't
    steal_bwd_input if this stage doesn't have backward"). Dropping backward actions and their sends and
    receives cannot deadlock a plan that ran before: it only removes waits.
    """
    full = schedule.pipeline_order_with_comms
    schedule.pipeline_order_with_comms = {
        rank: [a for a in actions if a.computation_type.value in _FORWARD_ACTIONS]
        for rank, actions in full.items()
    }
    try:
        yield
    finally:
        schedule.pipeline_order_with_comms = full
