"""Attention metadata of a (local) batch, made on the host before anything goes to the device.

Two facts decide which attention kernel a micro-batch can use (trainer/model/attention.py):

* every row is one document (plus trailing padding): then ``document_ids`` is dropped, and attention is
  plain causal (sdpa ``is_causal=True``, flash-eligible). Trailing padding is harmless under a causal mask:
  real tokens never see later slots, and padding slots carry no labels.
* otherwise ``doc_lens`` [B, K] int32: the lengths of each row's consecutive document runs (a padding run is
  a segment of its own), zero-padded to K = the most runs of any row in the batch. varlen's cu_seqlens are
  their cumulative sum, computed on the device without reading anything back. K is fixed for the whole
  batch so micro-batching and torch.distributed.pipelining can split doc_lens along dim 0 like input_ids.

Under context parallelism the rows are split into zigzag chunks afterwards and attention keeps using
``document_ids`` (varlen cannot run there), so no doc_lens is added; the single-document drop still applies.
"""

from __future__ import annotations

import torch

from trainer.data.packing import PAD_DOC


def run_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S]: True where a new run of equal document ids begins (always at slot 0)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def one_document_rows(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B]: the row is at most one document run followed by at most one (trailing) padding run."""
    starts = run_starts(document_ids)
    pad = document_ids == PAD_DOC
    real_runs = (starts & ~pad).sum(1)
    pad_runs = (starts & pad).sum(1)
    trailing = pad[:, -1] | (pad_runs == 0)
    return (real_runs <= 1) & (pad_runs <= 1) & trailing


def document_run_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, K]: lengths of each row's consecutive runs in order, zero-padded to K = max runs per row."""
    B, S = document_ids.shape
    run = run_starts(document_ids).cumsum(1) - 1  # run number of every slot within its row
    K = int(run[:, -1].max()) + 1 if B else 0
    flat = run + torch.arange(B).unsqueeze(1) * K
    return torch.bincount(flat.flatten(), minlength=B * K).view(B, K).to(torch.int32)


def attention_metadata(batch: dict[str, torch.Tensor], context_parallel: bool) -> dict[str, torch.Tensor]:
    """``batch`` without document_ids when every row is one document, else with doc_lens (not under cp).

    Expects the CPU tensors of the batch (this runs before the device copy and before the cp split).
    """
    docs = batch.get("document_ids")
    if docs is None:
        return batch
    if docs.device.type != "cpu":
        raise ValueError(f"attention_metadata reads document_ids on the host, got a tensor on {docs.device}")
    if bool(one_document_rows(docs).all()):
        return {k: v for k, v in batch.items() if k != "document_ids"}
    if context_parallel:
        return batch
    return {**batch, "doc_lens": document_run_lengths(docs)}
