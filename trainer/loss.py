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


def cross_entropy_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, shaped like labels; 0 where labels equal IGNORE_INDEX.

    Logits may be a DTensor sharded on the vocabulary dim (tensor parallelism with loss parallelism);
    call this, and the backward, inside ``parallel.tensor_parallel.loss_context``. The result is then
    replicated and returned as a plain tensor so callers can sum it across ranks like any other.
    """
    loss = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    return loss.view(labels.shape)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; labels equal to IGNORE_INDEX contribute nothing."""
    return cross_entropy_tokens(logits, labels).sum()


class DocumentLoss:
    """The per-document mean loss of a step: each document's mean token loss, averaged over documents.

    Keys are the sample ids of the step's global batch (every rank holds it, so every rank builds the same
    key list); ranks add their tokens' losses, the sums are then added over the ranks that hold different
    tokens, so documents split over rows, micro-batches or context-parallel ranks are counted whole.
    """

    def __init__(self, global_sample_ids: torch.Tensor, device: torch.device):
        self.keys = torch.unique(global_sample_ids[global_sample_ids >= 0]).to(device)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.keys), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, token_losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        valid = labels != IGNORE_INDEX
        idx = torch.searchsorted(self.keys, sample_ids[valid].to(self.keys.device))
        self.sums.index_add_(0, idx, token_losses.detach()[valid].double())
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def value(self, reduce) -> float:
        """`reduce(tensor)` sums a tensor over the ranks that hold different tokens (in place)."""
        both = reduce(torch.stack([self.sums, self.counts]))
        seen = both[1] > 0
        return float((both[0][seen] / both[1][seen]).mean()) if seen.any() else float("nan")


def count_valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
