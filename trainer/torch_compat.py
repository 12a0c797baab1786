"""What differs between the torch releases meshtron supports, detected once, in this one module.

The supported range is pyproject.toml's ``torch>=2.11,<2.15``. Code elsewhere asks this module what the
installed torch can do and never reads ``torch.__version__`` to decide. Where an API differs inside the range,
the difference is detected from the API itself (a signature, an attribute), not from a version number, so a
patch release or a nightly that has the newer API takes the newer path.

Differences handled here (read from each release's source, 2026-12-06):

* ``torch.nn.attention.varlen.varlen_attn``: 2.11 has ``window_size`` but no ``enable_gqa``; 2.13 and 2.14
  add ``enable_gqa``. Every release passes the un-expanded key/value to the same
  ``aten._flash_attention_forward`` / ``_flash_attention_backward`` (2.13's ``enable_gqa`` only gates a shape
  check before that call), and flash's varlen kernel takes fewer key/value heads than query heads itself
  ("Number of heads in key/value must divide number of heads in query" is its check; backward sums dk/dv over
  each group). So grouped-query attention is native on every release: on 2.11 the call omits the flag, and
  no key/value head is expanded.
* ``torch.distributed._functional_collectives.all_gather_single_autograd`` is new in 2.13;
  ``all_gather_tensor_autograd`` exists in 2.11-2.14 (deprecated from 2.13 in favour of the former, which it
  calls). Both: all-gather forward, reduce-scatter (sum) backward.
* ``torch._foreach_mul_`` on DTensors: 2.11 leaves a DTensor with a ``Partial`` placement unscaled (found on
  CPU/gloo; 2.13 and 2.14 scale it), so ``torch.nn.utils.clip_grads_with_norm_`` did not clip the gradients of
  tensor-parallel norm weights under sequence parallelism. :func:`clip_grads_with_norm_` scales those one by one.
* Pipeline warm-up: 2.11's schedules open the P2P links with each stage's ``_get_init_p2p_neighbors_ops``,
  which also addresses a neighbour stage on the same rank (stages 1 and 2 of ZB-V's V placement at pp 2);
  gloo has no pair to its own rank ("Pair is not connected"). 2.13 and 2.14 warm ``PipelineStage``s up by a
  vote that does not call it. :func:`pipeline_stage_class` drops the self-addressed warm-up ops: co-located stages
  hand their tensors over locally in every release, so a link to oneself is never used.

* Pipeline mode switch: a schedule builds its stages' receive buffers once, on its first call, with
  ``requires_grad`` only when that call has a backward. 2.13 and 2.14 rebuild them when a training step follows
  an ``eval()`` (``reinit_for_mode_switch``); 2.11 does not, so a run whose first schedule call is an eval
  (trainer.objective=dpo's precomputed reference) fails its first training step ("has gradients None").
  :func:`forget_pipeline_forward_setup` after each eval that comes before any training step makes the next call
  build them again, which every release does right.

Outside Python, one more: torchrun's ``--shutdown-timeout`` is missing from 2.11 (its agent waits a fixed 30 s
for the workers after a signal); slurm/train.sbatch passes it only where ``--help`` lists it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# The oldest release meshtron runs on; what a refusal names.
OLDEST_SUPPORTED = "2.11"

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


# ------------------------------------------------------------------------------------------ varlen


@functools.lru_cache(maxsize=None)
def varlen_params() -> Optional[frozenset[str]]:
    """The parameter names of this torch's ``varlen_attn`` (None where it has none), read once."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_missing() -> Optional[str]:
    """Why this torch's ``varlen_attn`` cannot run meshtron's attention (causal, optionally windowed, MHA or
    GQA), or None when it can. Every release in the supported range can; this names what another build lacks."""
    params = varlen_params()
    if params is None:
        return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                f"(needs torch >= {OLDEST_SUPPORTED})")
    if "window_size" not in params:
        return (f"torch {torch.__version__}'s varlen_attn has no window_size parameter "
                f"(needs torch >= {OLDEST_SUPPORTED})")
    return None


def varlen_kwargs(window: tuple[int, int], gqa: bool) -> dict:
    """Keyword arguments for this torch's ``varlen_attn``: the causal (or windowed) ``window_size`` and, where
    the signature has it, ``enable_gqa`` (without it, flash takes the grouped key/value heads as they are)."""
    kwargs: dict = {"window_size": window}
    if gqa and "enable_gqa" in (varlen_params() or ()):
        kwargs["enable_gqa"] = True
    return kwargs


# ----------------------------------------------------------------------------------- collectives


def _has_partial(grad) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements)


def clip_grads_with_norm_(params: list, max_norm: float, total_norm: torch.Tensor) -> None:
    """``torch.nn.utils.clip_grads_with_norm_`` correct on every release (all gradients on one mesh): gradients
    still ``Partial`` (summed lazily: tensor-parallel norm weights) are scaled one by one, since 2.11's foreach
    multiply leaves them as they were; they are few and small. The rest are scaled in one foreach op."""
    partial = [p for p in params if _has_partial(p.grad)]
    rest = [p for p in params if not _has_partial(p.grad)]
    if rest:
        torch.nn.utils.clip_grads_with_norm_(rest, max_norm, total_norm)
    if partial:
        torch.nn.utils.clip_grads_with_norm_(partial, max_norm, total_norm, foreach=False)



def all_gather_autograd(t: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    """All-gather along ``gather_dim`` with autograd (backward: reduce-scatter, summed), on every release."""
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(t, gather_dim=gather_dim, group=group)


@functools.lru_cache(maxsize=None)
def pipeline_stage_class() -> type:
    """torch's ``PipelineStage`` whose P2P warm-up never addresses its own rank (2.11; see the module
    docstring). Releases that warm up by their vote never call the overridden method. Built on first use:
    torch.distributed.pipelining is imported only by pipeline-parallel runs."""
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        def _get_init_p2p_neighbors_ops(self) -> list:
            own = dist.get_rank(self.group)
            return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != own]

    return Stage


@contextlib.contextmanager
def quiet_torchao():
    """torchao's import logs a warning for each CUDA kernel library it cannot load on this machine (every CPU
    machine, every GPU other than the one it was built for) and warns about a deprecated torch.compile
    registration; torch's pytree logger (torch 2.13) warns once for each Enum torchao registers as a pytree
    constant (KernelPreference, ...): nothing a user can act on, and a refusal must stay one line."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*register_constant.*")
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def forget_pipeline_forward_setup(schedule) -> None:
    """Make a pipeline schedule's next call set its stages up again (receive buffers, P2P warm-up), as its first
    call did: after an ``eval()`` that was the schedule's first call, so that the first training step builds
    receive buffers that take gradients (see the module docstring). The single- and multi-stage schedules of
    2.11-2.14 keep the state in one of these two attributes."""
    for attr in ("_stage_forward_initialized", "_stages_forward_initialized"):
        if hasattr(schedule, attr):
            setattr(schedule, attr, False)
