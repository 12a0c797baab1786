"""Cross-entropy as a sum over valid tokens.

The step's loss is this sum divided by the global count of valid tokens in the step (all micro-batches and,
with parallelism, all data- and context-parallel ranks), never a mean of per-batch means: with variable
numbers of valid tokens per micro-batch a mean of means weights tokens unequally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; labels equal to IGNORE_INDEX contribute nothing.

    Logits may be a DTensor sharded on the vocabulary dim (tensor parallelism with loss parallelism);
    call this, and the backward, inside ``parallel.tensor_parallel.loss_context``. The result is then a
    replicated scalar, returned as a plain tensor so callers can sum it across ranks like any other.
    """
    loss = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def count_valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
