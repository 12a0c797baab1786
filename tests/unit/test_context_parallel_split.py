"""The load-balanced (zigzag) sequence split for context parallelism; no process group."""

from __future__ import annotations

import pytest
import torch

from parallel.context_parallel import shard_batch_for_cp, zigzag_indices


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_covers_every_index_once(cp):
    seq_len = 8 * cp
    parts = [zigzag_indices(seq_len, cp, r) for r in range(cp)]
    assert all(p.dtype == torch.long and p.shape == (seq_len // cp,) for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(seq_len))


def test_zigzag_chunk_order():
    # 16 tokens, cp=4 -> 8 chunks of 2; rank r holds chunk r then chunk 7-r.
    assert zigzag_indices(16, 4, 0).tolist() == [0, 1, 14, 15]
    assert zigzag_indices(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert zigzag_indices(16, 4, 3).tolist() == [6, 7, 8, 9]
    assert zigzag_indices(12, 1, 0).tolist() == list(range(12))


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_balances_causal_work(cp):
    # Under a causal mask token i attends to i + 1 keys: every rank must do the same amount.
    work = [int((zigzag_indices(24 * cp, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1
    # A contiguous split would not be balanced (the reason for the zigzag).
    contiguous = [sum(range(r * 24 + 1, (r + 1) * 24 + 1)) for r in range(cp)]
    assert len(set(contiguous)) == cp


def test_zigzag_rejects_bad_divisibility_and_rank():
    with pytest.raises(ValueError, match=r"seq_len=10.*cp=4"):
        zigzag_indices(10, 4, 0)
    with pytest.raises(ValueError, match="seq_len=6"):
        zigzag_indices(6, 2, 1)  # divisible by cp but not by 2*cp
    with pytest.raises(ValueError, match="out of range"):
        zigzag_indices(16, 2, 2)


def _batch(B=2, S=16, with_positions=True):
    ids = torch.arange(B * S).view(B, S)
    batch = {"input_ids": ids, "labels": ids + 1000}
    if with_positions:
        # Three packed documents per row, positions restarting at each.
        docs = torch.tensor([0] * 5 + [1] * 7 + [2] * 4).expand(B, S)
        starts = torch.tensor([0] * 5 + [5] * 7 + [12] * 4)
        batch["document_ids"] = docs
        batch["position_ids"] = (torch.arange(S) - starts).expand(B, S)
    return batch


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_batch_slices_every_tensor_consistently(cp):
    batch = _batch()
    shards = [shard_batch_for_cp(batch, cp, r) for r in range(cp)]
    for r, shard in enumerate(shards):
        index = zigzag_indices(16, cp, r)
        assert set(shard) == {"input_ids", "labels", "position_ids", "document_ids", "seq_index"}
        assert torch.equal(shard["seq_index"], index.expand(2, -1))
        for name in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(shard[name], batch[name][:, index]), name
    # Putting the shards back by seq_index rebuilds every full tensor.
    index = torch.cat([s["seq_index"] for s in shards], dim=1)
    for name in batch:
        rebuilt = torch.empty_like(batch[name]).scatter_(1, index, torch.cat([s[name] for s in shards], dim=1))
        assert torch.equal(rebuilt, batch[name])


def test_shard_batch_default_positions_are_row_indices():
    batch = _batch(with_positions=False)
    shard = shard_batch_for_cp(batch, 2, 1)
    assert shard["position_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]] * 2
    assert torch.equal(shard["position_ids"], shard["seq_index"])
    assert "document_ids" not in shard
    assert "position_ids" not in batch  # the caller's dict is left alone


def test_shard_batch_rejects_mismatched_tensor():
    batch = _batch(with_positions=False)
    batch["labels"] = batch["labels"][:, :8]
    with pytest.raises(ValueError, match="labels"):
        shard_batch_for_cp(batch, 2, 0)
