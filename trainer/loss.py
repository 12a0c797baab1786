"""Cross-entropy as a sum over valid tokens.

The step's loss is this sum divided by the global count of valid tokens in the step (all micro-batches and,
with parallelism, all data- and context-parallel ranks), never a mean of per-batch means: with variable
numbers of valid tokens per micro-batch a mean of means weights tokens unequally.

The per-token losses come from the output layer and cross-entropy run a chunk of tokens at a time
(chunked_token_losses, trainer.loss_chunk_size), so the [tokens, vocab] logits never exist whole, and only at
the positions whose label counts (label_index, selected_token_losses): a chat prompt's tokens, a preference pair's
shared prompt and padding never reach the output layer.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def cross_entropy_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, shaped like labels; 0 where labels equal IGNORE_INDEX.

    Logits may be a DTensor sharded on the vocabulary dim (tensor parallelism with loss parallelism);
    call this, and the backward, inside ``parallel.tensor_parallel.vocab_parallel_loss``. The result is then
    replicated and returned as a plain tensor so callers can sum it across ranks like any other.
    """
    loss = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    return loss.view(labels.shape)


ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def chunked_token_losses(chunk_fn: ChunkFn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         vocab_size: int, chunk_size: int) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shaped like labels) of hidden [..., h] through the output layer,
    ``chunk_size`` tokens at a time; ``chunk_size=0`` (or a chunk as large as the input) runs it whole.

    ``chunk_fn(hidden [n, h], weight, labels [n], vocab_size) -> losses [n]`` is the output layer and
    cross-entropy of one chunk (GPTModel.loss_chunk_fn). With gradients, each call runs under
    non-reentrant activation checkpointing: its forward keeps only its inputs (a view of ``hidden``, the
    weight, the labels) and its [n] losses, and backward recomputes its logits just before their gradient.
    The autograd engine runs the ready node with the highest sequence number first, so one chunk's backward
    finishes before the previous chunk's recompute starts: at most one chunk's logits exist at a time.
    The recompute reuses the caller's autocast state (checkpoint restores it), must run inside the same
    ``loss_parallel`` context as the forward, and sees the weight tensor the forward saw (under FSDP2 the
    root's unsharded parameter, unsharded again by its pre-backward hook).
    """
    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    if chunk_size == 0 or chunk_size >= flat_labels.numel():
        return chunk_fn(flat_hidden, weight, flat_labels, vocab_size).view(labels.shape)
    recompute = torch.is_grad_enabled() and (flat_hidden.requires_grad or weight.requires_grad)
    losses = []
    for h, y in zip(flat_hidden.split(chunk_size), flat_labels.split(chunk_size)):
        if recompute:
            # No RNG inside a loss chunk, so there is no RNG state to stash and restore.
            losses.append(checkpoint(chunk_fn, h, weight, y, vocab_size, use_reentrant=False,
                                     preserve_rng_state=False))
        else:
            losses.append(chunk_fn(h, weight, y, vocab_size))
    return torch.cat(losses).view(labels.shape)


def label_index(labels: torch.Tensor) -> Optional[torch.Tensor]:
    """Host side, per row of labels [B, S]: the positions of its valid labels in order, then as many of its
    ignored positions as fill K, the most valid labels of any row: int64 [B, K]. None when no row has an
    ignored label (K = S: nothing to skip). A prefix of a permutation of each row, so no position repeats."""
    ignored = labels.numpy() == IGNORE_INDEX
    if ignored.size == 0 or not ignored.any():
        return None
    k = max(int((~ignored).sum(1).max()), 1)
    return torch.from_numpy(np.ascontiguousarray(np.argsort(ignored, axis=1, kind="stable")[:, :k]))


def selected_token_losses(chunk_fn: ChunkFn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          index: torch.Tensor, vocab_size: int, chunk_size: int, multiple: int) -> torch.Tensor:
    """chunked_token_losses at the positions ``index`` [B, K] (label_index) of labels [B, S] only; the other
    positions' losses are 0, as their labels are ignored: equal to chunked_token_losses over every position.

    The output layer is the step's largest matmul after the layers (hidden x vocab per token), and in chat
    SFT or preference data most positions are prompt: TRL's fused LM head skips them the same way. The
    B * K selected rows are padded with ignored labels to a multiple of ``multiple`` rows (GPTModel passes
    64, or its chunk size when the chunk is compiled, so a compiled chunk sees one shape every step);
    where that padding would not save a row, or with ``multiple`` 0, every position runs as before. A
    Replicate DTensor hidden state (tensor parallelism) is indexed by a replicated index; the gathers and
    the scatter back are differentiable.
    """
    B, S = labels.shape
    n = index.numel()
    rows = min(multiple, B * S)
    padded = -(-n // rows) * rows if rows else B * S
    if padded >= B * S:
        return chunked_token_losses(chunk_fn, hidden, weight, labels, vocab_size, chunk_size)
    flat = (index + torch.arange(B, device=index.device).unsqueeze(1) * S).flatten()
    take = torch.cat([flat, flat.new_zeros(padded - n)])  # padding rows: position 0, label ignored
    y = torch.cat([labels.flatten()[flat], labels.new_full((padded - n,), IGNORE_INDEX)])
    if isinstance(hidden, DTensor):
        take = DTensor.from_local(take, hidden.device_mesh, [Replicate()] * hidden.device_mesh.ndim,
                                  run_check=False)
    h = hidden.flatten(0, -2).index_select(0, take)
    losses = chunked_token_losses(chunk_fn, h, weight, y, vocab_size, chunk_size)[:n]
    return losses.new_zeros(B * S).index_copy(0, flat, losses).view(B, S)


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
        # Built on the host from the host batch; an asynchronous copy, so the step never waits for the device.
        self.keys = torch.unique(global_sample_ids[global_sample_ids >= 0]).to(device, non_blocking=True)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.keys), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, token_losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        if len(self.keys) == 0:  # only padding in the step
            return
        # Masks by weight, not by boolean indexing: indexing a device tensor by a mask is a host sync.
        # Invalid slots add an exact 0 (to document 0 when their sample id is padding's -1).
        valid = (labels != IGNORE_INDEX).flatten()
        # contiguous(): a pipeline stage's micro-batch slice can arrive strided, which searchsorted warns about.
        idx = torch.searchsorted(self.keys, sample_ids.flatten().to(self.keys.device).contiguous())
        idx = idx.clamp_(max=len(self.keys) - 1)
        losses = token_losses.detach().flatten().double()
        self.sums.index_add_(0, idx, torch.where(valid, losses, torch.zeros_like(losses)))
        self.counts.index_add_(0, idx, valid.double())

    def value(self, reduce) -> float:
        """`reduce(tensor)` sums a tensor over the ranks that hold different tokens (in place)."""
        both = reduce(torch.stack([self.sums, self.counts]))
        seen = both[1] > 0
        return float((both[0][seen] / both[1][seen]).mean()) if seen.any() else float("nan")


def count_valid(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
