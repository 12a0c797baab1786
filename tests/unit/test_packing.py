"""Packing rules: fields, document isolation, positions, BFD, overlong policies, padding, efficiency."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus
from trainer.data.packing import IGNORE_INDEX, PAD_DOC, PackedRows, best_fit_decreasing, pack_corpus

EOS = 99_999


def corpus(lengths, sft=False, seed=0) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = rng.integers(0, 50_000, int(lengths.sum())).astype(np.uint32)
    targets = rng.random(len(tokens)) < 0.7 if sft else None
    return TokenizedCorpus("synthetic", tokens, np.cumsum(np.r_[0, lengths]), targets)


def lognormal_lengths(n, median, seed=0, lo=2, hi=None):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(lo, rng.lognormal(np.log(median), 0.9, n).astype(np.int64))
    return lengths if hi is None else np.minimum(lengths, hi)


def check_invariants(rows: PackedRows, c: TokenizedCorpus, eos) -> None:
    """Every real slot's input/label is the right token of its own document; positions restart per piece."""
    S = rows.seq_len
    assert rows.input_ids.dtype == np.int32 and rows.sample_ids.dtype == np.int64
    for f in PackedRows.FIELDS:
        assert getattr(rows, f).shape == (rows.num_rows, S)
    pad = rows.sample_ids == PAD_DOC
    assert (rows.document_ids[pad] == PAD_DOC).all() and (rows.labels[pad] == IGNORE_INDEX).all()
    assert (rows.document_ids[~pad] >= 0).all()
    for r in range(rows.num_rows):
        doc, pos, sid = rows.document_ids[r], rows.position_ids[r], rows.sample_ids[r]
        for j in range(S):
            if pad[r, j]:
                continue
            new_piece = j == 0 or doc[j] != doc[j - 1]
            if new_piece:
                assert pos[j] == 0
                assert doc[j] not in doc[:j]  # distinct per piece within the row
            else:
                assert pos[j] == pos[j - 1] + 1 and sid[j] == sid[j - 1]
        # Reconstruct each piece from the corpus: inputs are a window of its own document, labels the next
        # token of the same document (EOS at its end for pretraining, masked by targets for SFT).
        for d in np.unique(doc[doc != PAD_DOC]):
            where = np.flatnonzero(doc == d)
            s = int(sid[where[0]])
            assert (sid[where] == s).all()
            full = np.r_[c.doc(s).astype(np.int64), [eos]] if eos is not None else c.doc(s).astype(np.int64)
            first = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(full[:-1], len(where))
                                        == rows.input_ids[r, where]).all(1))[0])
            expect = full[first + 1:first + 1 + len(where)]
            if c.targets is not None:
                tg = c.doc_targets(s)[first + 1:first + 1 + len(where)]
                expect = np.where(tg, expect, IGNORE_INDEX)
            np.testing.assert_array_equal(rows.labels[r, where], expect)


def test_pretrain_packed_fills_rows_and_keeps_boundaries():
    c = corpus([5, 3, 10, 1, 0, 7, 40, 2])
    rows = pack_corpus(c, 8, EOS, packing=True)
    total_slots = int(np.diff(c.offsets).sum())  # len(doc + EOS) - 1 each
    assert rows.num_rows == total_slots // 8 and rows.efficiency == 1.0
    check_invariants(rows, c, EOS)
    # Concatenate-and-chunk: the slot stream in row order is the corpus in order, nothing skipped.
    np.testing.assert_array_equal(rows.input_ids.reshape(-1), c.tokens[:rows.num_rows * 8])
    # A document crossing a row boundary continues as a new piece at position 0.
    assert rows.sample_ids[2, 0] == rows.sample_ids[1, -1] == 2 and rows.position_ids[2, 0] == 0
    assert rows.position_ids[1, -1] == 7
    # Labels never cross documents: the last slot of every document predicts EOS.
    flat_s, flat_l = rows.sample_ids.reshape(-1), rows.labels.reshape(-1)
    ends = np.flatnonzero(flat_s[1:] != flat_s[:-1])
    assert (flat_l[ends] == EOS).all()


def test_pretrain_unpacked_pads_and_chunks_long_documents():
    c = corpus([5, 20, 3])
    rows = pack_corpus(c, 8, EOS, packing=False)
    assert rows.num_rows == 1 + 3 + 1  # 5 slots, 20 slots -> 3 rows, 3 slots
    check_invariants(rows, c, EOS)
    assert (rows.document_ids[~(rows.sample_ids == PAD_DOC)] == 0).all()
    assert rows.efficiency == pytest.approx(28 / 40)
    np.testing.assert_array_equal(rows.sample_ids[:, 0], [0, 1, 1, 1, 2])


def test_sft_bfd_never_splits_and_beats_naive():
    c = corpus(lognormal_lengths(400, 60, hi=129), sft=True)
    rows = pack_corpus(c, 128, None, packing=True)
    check_invariants(rows, c, None)
    # Each conversation sits whole in exactly one row, starting at position 0.
    sizes = np.diff(c.offsets) - 1
    for s in range(c.num_docs):
        r, j = np.nonzero(rows.sample_ids == s)
        assert len(set(r.tolist())) == 1 and len(j) == sizes[s]
        assert rows.position_ids[r[0], j.min()] == 0
    # Naive next-fit in corpus order: close the row when the next conversation does not fit.
    naive, used = 1, 0
    for s in sizes:
        if used + s > 128:
            naive, used = naive + 1, 0
        used += s
    assert rows.num_rows < naive
    assert rows.num_rows >= -(-sizes.sum() // 128)
    assert rows.efficiency > 0.95
    unpacked = pack_corpus(c, 128, None, packing=False)
    assert unpacked.num_rows == c.num_docs and unpacked.efficiency < 0.6


def test_best_fit_decreasing_small_case():
    bins, offsets, n = best_fit_decreasing(np.array([5, 4, 3, 3, 2, 2, 1]), 10)
    used = np.bincount(bins, weights=[5, 4, 3, 3, 2, 2, 1])
    assert n == 2 and (used == 10).all()
    for b in range(n):  # items of a bin tile it without overlap
        sel = np.flatnonzero(bins == b)
        spans = sorted((offsets[i], offsets[i] + [5, 4, 3, 3, 2, 2, 1][i]) for i in sel)
        assert spans[0][0] == 0 and all(a[1] == b_[0] for a, b_ in zip(spans, spans[1:]))


def test_overlong_policies():
    c = corpus([5, 30, 9, 12], sft=True)  # seq_len 8: conversations over 9 tokens are overlong
    t = pack_corpus(c, 8, None, overlong="truncate")
    assert (t.truncated, t.dropped) == (2, 0)
    check_invariants(t, c, None)
    assert sorted(set(t.sample_ids[t.sample_ids >= 0].tolist())) == [0, 1, 2, 3]
    assert (t.sample_ids == 1).sum() == 8  # first seq_len + 1 tokens kept
    d = pack_corpus(c, 8, None, overlong="drop")
    assert (d.truncated, d.dropped) == (0, 2)
    assert sorted(set(d.sample_ids[d.sample_ids >= 0].tolist())) == [0, 2]
    with pytest.raises(ConfigError, match=r"sample 1 has 30 tokens.*seq_len\+1=9"):
        pack_corpus(c, 8, None, overlong="error")
    nopack = pack_corpus(c, 8, None, packing=False, overlong="drop")
    assert nopack.num_rows == 2 and nopack.dropped == 2


def test_deterministic_and_sample_id_base():
    c = corpus(lognormal_lengths(100, 20, hi=33), sft=True)
    a, b = pack_corpus(c, 32, None), pack_corpus(c, 32, None, sample_id_base=1000)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(np.where(a.sample_ids >= 0, a.sample_ids + 1000, -1), b.sample_ids)


def test_pretrain_requires_eos():
    with pytest.raises(ValueError, match="eos_id"):
        pack_corpus(corpus([4, 4]), 4, None)
