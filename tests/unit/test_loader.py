"""GlobalBatchLoader: order by (seed, epoch), blends, resume across dp degrees, prefetch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus
from trainer.data.loader import Blend, GlobalBatchLoader, blend_schedule
from trainer.data.packing import PackedRows, pack_corpus

FIELDS = PackedRows.FIELDS


def rows_of(n_docs, seq_len=16, sft=True, base=0, seed=0) -> PackedRows:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, seq_len + 2, n_docs)
    tokens = rng.integers(0, 1000, int(lengths.sum())).astype(np.uint32)
    targets = np.ones(len(tokens), bool) if sft else None
    c = TokenizedCorpus(f"c{seed}", tokens, np.cumsum(np.r_[0, lengths]), targets)
    return pack_corpus(c, seq_len, None if sft else 3, sample_id_base=base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def row_keys(batch) -> list[tuple]:
    """Identity of each row: its sample ids (a row of packed docs is unique in these corpora)."""
    return [tuple(r.tolist()) for r in batch["sample_ids"]]


def test_batches_shapes_and_epoch_is_a_permutation():
    rows = rows_of(200)
    with GlobalBatchLoader(rows, 8, seed=1) as loader:
        n = loader.batches_per_epoch
        batches = take(loader, n)
        assert loader.epoch == 0 and loader.position == loader.rows_per_epoch
        next(loader)
        assert loader.epoch == 1
    for f in FIELDS:
        assert batches[0][f].shape == (8, rows.seq_len) and batches[0][f].dtype == torch.int64
    seen = [k for b in batches for k in row_keys(b)]
    assert len(set(seen)) == len(seen) == n * 8  # no row twice within an epoch


def test_order_is_fixed_by_seed_and_epoch_without_global_rng():
    rows = rows_of(200)
    torch.manual_seed(0)
    a = take(GlobalBatchLoader(rows, 8, seed=5, prefetch=0), 30)
    torch.manual_seed(123)
    np.random.seed(7)
    b = take(GlobalBatchLoader(rows, 8, seed=5, prefetch=0), 30)
    c = take(GlobalBatchLoader(rows, 8, seed=6, prefetch=0), 30)
    assert all(torch.equal(x[f], y[f]) for x, y in zip(a, b) for f in FIELDS)
    assert not all(torch.equal(x["sample_ids"], y["sample_ids"]) for x, y in zip(a, c))
    blend = Blend([rows], [1.0])
    assert not np.array_equal(blend.epoch_order(5, 0), blend.epoch_order(5, 1))
    np.testing.assert_array_equal(blend.epoch_order(5, 1), blend.epoch_order(5, 1))


def test_prefetch_on_and_off_give_identical_batches():
    rows = rows_of(150)
    on = GlobalBatchLoader(rows, 4, seed=2, prefetch=3)
    off = GlobalBatchLoader(rows, 4, seed=2, prefetch=0)
    for x, y in zip(take(on, 40), take(off, 40)):  # crosses epoch boundaries
        assert all(torch.equal(x[f], y[f]) for f in FIELDS)
    assert on.state_dict() == off.state_dict()  # counted at the consumer, not the prefetch thread
    on.close()
    assert on._thread is None


def test_prefetch_thread_reraises_in_main_thread():
    loader = GlobalBatchLoader(rows_of(50), 4, seed=0, prefetch=2)

    def boom(ids):
        raise RuntimeError("corrupt shard")

    loader.blend.gather = boom
    with pytest.raises(RuntimeError, match="corrupt shard"):
        next(loader)
    assert loader._thread is None


def consume(loader, steps, dp):
    """Simulate the trainer: every rank draws the global batch and keeps its dp slice; collect all ranks."""
    out = []
    for _ in range(steps):
        batch = next(loader)
        per = batch["sample_ids"].shape[0] // dp
        for r in range(dp):
            out.append(batch["sample_ids"][r * per:(r + 1) * per])
    return torch.cat(out)


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (4, 2)])
def test_resume_with_other_dp_continues_the_same_global_order(dp_before, dp_after):
    rows = rows_of(300, sft=False)
    steps, k = 40, 13  # crosses an epoch boundary either side of the save
    reference = consume(GlobalBatchLoader(rows, 8, seed=3), steps, dp=1)

    first = GlobalBatchLoader(rows, 8, seed=3)
    before = consume(first, k, dp_before)
    state = first.state_dict()
    first.close()
    resumed = GlobalBatchLoader(rows, 8, seed=3, prefetch=0)
    resumed.load_state_dict(state)
    after = consume(resumed, steps - k, dp_after)
    combined = torch.cat([before, after])
    assert torch.equal(combined, reference)  # same order, hence same multiset: nothing repeated or skipped
    assert Counter(combined.reshape(-1).tolist()) == Counter(reference.reshape(-1).tolist())


def test_state_mismatch_is_detected():
    loader = GlobalBatchLoader(rows_of(100), 4, seed=0)
    state = loader.state_dict()
    with pytest.raises(ConfigError, match="other data"):
        GlobalBatchLoader(rows_of(100, seed=1), 4, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        GlobalBatchLoader(rows_of(100), 4, seed=1).load_state_dict(state)


def test_blend_schedule_proportions_over_every_prefix():
    weights = [0.5, 0.3, 0.2]
    sched = blend_schedule(weights, 5000)
    counts = np.zeros(3)
    p = np.asarray(weights) / sum(weights)
    for k, s in enumerate(sched, 1):
        counts[s] += 1
        assert np.abs(counts - k * p).max() <= 1.0


def test_blend_repeats_small_sources_and_keeps_ids_apart():
    big, small = rows_of(400, base=0, seed=0), rows_of(20, base=10_000, seed=1)
    blend = Blend([big, small], [1.0, 1.0])
    assert blend.rows_per_epoch == big.num_rows + small.num_rows
    n_big, n_small = blend.rows_per_source()
    assert abs(n_big - n_small) <= 1 and n_small > small.num_rows  # the small one is repeated
    order = blend.epoch_order(seed=0, epoch=0)
    small_ids = order[order >= big.num_rows] - big.num_rows
    # Each pass over the small source is a full permutation before anything repeats.
    first_pass = small_ids[:small.num_rows]
    assert sorted(first_pass.tolist()) == list(range(small.num_rows))
    loader = GlobalBatchLoader(blend, 10, seed=0, prefetch=0)
    sids = torch.cat([b["sample_ids"][:, 0] for b in take(loader, 20)])
    from_small = (sids >= 10_000).float().mean().item()
    assert from_small == pytest.approx(0.5, abs=0.02)


def test_blend_custom_epoch_length():
    a, b = rows_of(100, seed=0), rows_of(100, base=5000, seed=1)
    blend = Blend([a, b], [3.0, 1.0], rows_per_epoch=400)
    assert blend.rows_per_source() == [300, 100]
    loader = GlobalBatchLoader(blend, 16, seed=0)
    assert loader.rows_per_epoch == 400 and loader.batches_per_epoch == 25
    loader.close()


def test_too_few_rows_for_a_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        GlobalBatchLoader(rows_of(3), 64, seed=0)


@pytest.mark.parametrize("rows_per_epoch", [0, 7, 23])
@pytest.mark.parametrize("shuffle", [True, False])
def test_one_source_needs_no_schedule_and_draws_the_same_order(rows_per_epoch, shuffle):
    """One source skips the blend schedule (O(rows) of index arrays) and gives the order the general blend
    path gives, repeats (more rows per epoch than the source has) included."""
    tokens = np.arange(1, 200, dtype=np.uint32)
    corpus = TokenizedCorpus("c", tokens, np.array([0, 50, 120, 199]))
    rows = pack_corpus(corpus, 16, eos_id=0)
    fast = Blend([rows], [1.0], rows_per_epoch=rows_per_epoch)
    general = Blend([rows], [1.0], rows_per_epoch=rows_per_epoch)
    general._schedule = np.zeros(general.rows_per_epoch, np.uint8)  # what blend_schedule gives one source
    assert fast._schedule is None and fast.rows_per_source() == general.rows_per_source()
    for epoch in range(3):
        np.testing.assert_array_equal(fast.epoch_order(9, epoch, shuffle), general.epoch_order(9, epoch, shuffle))
