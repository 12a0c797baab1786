"""RowIndex: rows gathered from an O(documents) index equal pack_corpus' in-memory rows exactly (every field,
dtype included), the index is cached and memory-mapped, and memory stays O(documents + batch)."""

from __future__ import annotations

import itertools
import json
import tracemalloc

import numpy as np
import pytest
import torch

from trainer.assets import BUNDLED_TRAIN
from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import packing, row_index
from trainer.data.build import ROW_INDEX_DIR, batches_in_order, build_split
from trainer.data.corpus import TokenizedCorpus
from trainer.data.loader import Blend, GlobalBatchLoader
from trainer.data.packing import PackedRows, concat_rows, pack_corpus
from trainer.data.pretrain import load_source_corpus
from trainer.data.row_index import ConcatRows, RowIndex, build_rows
from trainer.data.sft import BUNDLED_SFT_TRAIN, load_sft_corpus

EOS = 7
FIELDS = PackedRows.FIELDS


def assert_same(index: RowIndex, ref: PackedRows, ids: np.ndarray) -> None:
    assert (index.num_rows, index.seq_len) == (ref.num_rows, ref.seq_len)
    assert (index.truncated, index.dropped) == (ref.truncated, ref.dropped)
    assert index.efficiency == pytest.approx(ref.efficiency, abs=1e-12)
    got = index.gather(ids)
    for f in FIELDS:
        want = getattr(ref, f)[ids]
        assert got[f].dtype == want.dtype and got[f].shape == want.shape, f
        np.testing.assert_array_equal(got[f], want, err_msg=f)


def subsets(n: int, seed: int) -> list[np.ndarray]:
    """All rows in order, a random subset in random order (with a repeat), and a single row."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return [np.zeros(0, np.int64)]
    some = rng.choice(n, size=min(n, 37), replace=False)
    return [np.arange(n), np.r_[some, some[:1]], np.array([n - 1])]


def synthetic(seed: int, sft: bool) -> tuple[TokenizedCorpus, int]:
    """Random lengths including empty and single-token documents and ones several rows long."""
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, 24))
    n = int(rng.integers(0, 80))
    lengths = rng.integers(0, 4 * seq_len + 3, n) * (rng.random(n) > 0.15)
    lengths[rng.random(n) < 0.1] = 1
    tokens = rng.integers(0, 60_000, int(lengths.sum())).astype(np.uint16 if seed % 2 else np.uint32)
    targets = rng.random(len(tokens)) < 0.6 if sft else None
    return TokenizedCorpus(f"synthetic{seed}", tokens, np.cumsum(np.r_[0, lengths]).astype(np.int64), targets), seq_len


@pytest.mark.parametrize("seed", range(12))
def test_random_corpora_match_pack_corpus(seed):
    for sft, pack, overlong in itertools.product([False, True], [True, False], ["truncate", "drop"]):
        if not sft and overlong == "drop":
            continue  # overlong applies to SFT only
        c, seq_len = synthetic(seed, sft)
        rng = np.random.default_rng(seed + 100)
        lo = int(rng.integers(0, c.num_docs + 1))
        hi = int(rng.integers(lo, c.num_docs + 1))
        eos = None if sft else EOS
        for start, stop in ((0, c.num_docs), (lo, hi)):
            ref = pack_corpus(c, seq_len, eos, pack, overlong, sample_id_base=1000 * seed, start=start, stop=stop)
            index = build_rows(c, seq_len, eos, pack, overlong, sample_id_base=1000 * seed, start=start, stop=stop)
            for ids in subsets(ref.num_rows, seed):
                assert_same(index, ref, ids)


@pytest.fixture(scope="module")
def bundled_text(tmp_path_factory, tok):
    cache = tmp_path_factory.mktemp("tokens")
    return load_source_corpus(DataSource(path=str(BUNDLED_TRAIN), format="jsonl_text"), tok, DataConfig(), cache)


@pytest.fixture(scope="module")
def bundled_chat(tmp_path_factory, tok):
    cfg = DataConfig(format="messages")
    cache = tmp_path_factory.mktemp("sft")
    return load_sft_corpus(DataSource(path=str(BUNDLED_SFT_TRAIN), format="messages"), tok, cfg, cache)


@pytest.mark.parametrize("pack", [True, False])
def test_bundled_corpus_rows(bundled_text, tok, pack):
    c, eos = bundled_text, tok.eos_token_id
    tail = c.num_docs - max(1, c.num_docs // 10)  # a validation tail, as data.val_fraction holds out
    for seq_len, span, base in ((128, (0, c.num_docs), 0), (64, (0, tail), 0), (256, (tail, c.num_docs), 500)):
        ref = pack_corpus(c, seq_len, eos, pack, sample_id_base=base, start=span[0], stop=span[1])
        index = build_rows(c, seq_len, eos, pack, sample_id_base=base, start=span[0], stop=span[1])
        assert ref.num_rows > 0
        for ids in subsets(ref.num_rows, seq_len):
            assert_same(index, ref, ids)


@pytest.mark.parametrize("pack,overlong", [(True, "truncate"), (True, "drop"), (False, "truncate"), (False, "drop")])
def test_bundled_chat_rows(bundled_chat, pack, overlong):
    c = bundled_chat
    sizes = np.diff(c.offsets)
    seq_len = int(np.percentile(sizes, 80))  # so that a fifth of the conversations are overlong
    half = c.num_docs // 2
    for span, base in (((0, c.num_docs), 0), ((half, c.num_docs), 10_000)):
        ref = pack_corpus(c, seq_len, None, pack, overlong, sample_id_base=base, start=span[0], stop=span[1])
        index = build_rows(c, seq_len, None, pack, overlong, sample_id_base=base, start=span[0], stop=span[1])
        assert ref.truncated + ref.dropped > 0
        for ids in subsets(ref.num_rows, 3):
            assert_same(index, ref, ids)
    with pytest.raises(ConfigError, match=r"sample \d+ has \d+ tokens.*data.overlong"):
        build_rows(c, seq_len, None, pack, "error")


def test_memory_mapped_corpora_are_read_with_pread(tmp_path):
    """Tokens and targets as np.memmap (with a file offset, and a view into one, as read_megatron makes) and
    as np.load(mmap_mode="r") give the same rows as in memory."""
    for seed in range(6):
        c, seq_len = synthetic(seed, sft=seed % 2 == 1)
        head = 6 * c.tokens.itemsize  # a view starting 6 tokens into a mapping that starts 40 bytes in
        (tmp_path / "t.bin").write_bytes(b"x" * 40 + np.zeros(6, c.tokens.dtype).tobytes() + c.tokens.tobytes())
        mapped = np.memmap(tmp_path / "t.bin", dtype=c.tokens.dtype, mode="r", offset=40)[6:]
        assert row_index._file_position(mapped) == (str(tmp_path / "t.bin"), 40 + head)
        targets = None
        if c.targets is not None:
            np.save(tmp_path / "targets.npy", c.targets)
            targets = np.load(tmp_path / "targets.npy", mmap_mode="r")
            assert row_index._file_position(targets) is not None
        on_disk = TokenizedCorpus(c.name, mapped, c.offsets, targets)
        eos = None if c.targets is not None else EOS
        for pack in (True, False):
            ref = pack_corpus(c, seq_len, eos, pack)
            for ids in subsets(ref.num_rows, seed):
                assert_same(build_rows(on_disk, seq_len, eos, pack), ref, ids)


def test_materialized_fields_and_bad_row_ids():
    c, seq_len = synthetic(3, sft=False)
    ref, index = pack_corpus(c, seq_len, EOS), build_rows(c, seq_len, EOS)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(index, f), getattr(ref, f))
    with pytest.raises(IndexError, match=f"row {index.num_rows} is outside"):
        index.gather(np.array([0, index.num_rows]))
    with pytest.raises(IndexError, match="row -1"):
        index.gather(np.array([-1]))


def test_concat_and_blend_gather_lazily_like_in_memory_rows():
    parts = [synthetic(s, sft=s % 2 == 0)[0] for s in (4, 5)]
    refs = [pack_corpus(c, 9, None if c.targets is not None else EOS, sample_id_base=100 * i)
            for i, c in enumerate(parts)]
    indices = [build_rows(c, 9, None if c.targets is not None else EOS, sample_id_base=100 * i)
               for i, c in enumerate(parts)]
    joined, ref = ConcatRows(indices, "val"), concat_rows(refs, "val")
    assert joined.stats() == pytest.approx(ref.stats())
    for ids in subsets(ref.num_rows, 0):
        got = joined.gather(ids)
        assert all(np.array_equal(got[f], getattr(ref, f)[ids]) and got[f].dtype == getattr(ref, f).dtype
                   for f in FIELDS)
    for a, b in zip(batches_in_order(joined, 5, 100, "val"), batches_in_order(ref, 5, 100, "val")):
        assert all(torch.equal(a[f], b[f]) for f in FIELDS)
    lazy, eager = Blend(indices, [2.0, 1.0]), Blend(refs, [2.0, 1.0])
    assert lazy.fingerprint() == eager.fingerprint()
    with GlobalBatchLoader(lazy, 4, seed=1, prefetch=0) as a, GlobalBatchLoader(eager, 4, seed=1, prefetch=0) as b:
        for _ in range(2 * a.batches_per_epoch + 1):  # crosses epochs: same order, same rows
            x, y = next(a), next(b)
            assert all(torch.equal(x[f], y[f]) for f in FIELDS)


def test_fingerprint_sees_changed_tokens():
    c, _ = synthetic(6, sft=False)
    before = Blend([build_rows(c, 8, EOS)], [1.0]).fingerprint()
    tokens = c.tokens.copy()
    tokens[0] += 1  # row 0 is always in the fingerprint's sample
    changed = TokenizedCorpus(c.name, tokens, c.offsets)
    assert Blend([build_rows(changed, 8, EOS)], [1.0]).fingerprint() != before


# ---------------------------------------------------------------------------------------------- cache


def keyed(c: TokenizedCorpus, key: str = "corpus-key") -> TokenizedCorpus:
    return TokenizedCorpus(c.name, c.tokens, c.offsets, c.targets, key=key)


def test_sft_plan_is_cached_memory_mapped_and_keyed(bundled_chat, tmp_path, monkeypatch):
    c, cache = keyed(bundled_chat), tmp_path / "rows"
    ref = pack_corpus(c, 256, None)  # before the planner is disabled: the reference runs it too
    first = build_rows(c, 256, None, cache_dir=cache)
    assert len(list(cache.glob("*.meta.json"))) == 1
    assert all(isinstance(a, np.memmap) for a in first.arrays.values())

    def planner_must_not_run(*args, **kwargs):
        raise AssertionError("best_fit_decreasing ran although the plan is cached")

    monkeypatch.setattr(packing, "best_fit_decreasing", planner_must_not_run)
    again = build_rows(c, 256, None, cache_dir=cache)
    assert all(isinstance(a, np.memmap) for a in again.arrays.values())
    assert_same(again, ref, np.arange(again.num_rows))
    # Anything that decides the rows is part of the key: each of these plans anew.
    for kw in ({"seq_len": 128}, {"overlong": "drop"}, {"start": 1}, {"sample_id_base": 5}):
        args = {"seq_len": 256, "eos_id": None, **kw}
        with pytest.raises(AssertionError, match="cached"):
            build_rows(c, cache_dir=cache, **args)
    with pytest.raises(AssertionError, match="cached"):
        build_rows(keyed(c, "other contents"), 256, None, cache_dir=cache)


def test_no_key_builds_in_memory_and_a_corrupt_entry_is_rebuilt(tmp_path):
    c, cache = synthetic(7, sft=False)[0], tmp_path / "rows"
    index = build_rows(c, 8, EOS, cache_dir=cache)
    assert not cache.exists() or not list(cache.iterdir())
    assert not any(isinstance(a, np.memmap) for a in index.arrays.values())
    c = keyed(c)
    build_rows(c, 8, EOS, cache_dir=cache)
    meta = next(cache.glob("*.meta.json"))
    stem = str(meta)[:-len(".meta.json")]
    np.save(f"{stem}.ends.npy", np.zeros(3, np.int64))  # wrong length: detected, rebuilt, overwritten
    rebuilt = build_rows(c, 8, EOS, cache_dir=cache)
    assert_same(rebuilt, pack_corpus(c, 8, EOS), np.arange(rebuilt.num_rows))
    meta.write_text("{ broken")
    assert build_rows(c, 8, EOS, cache_dir=cache).num_rows == rebuilt.num_rows
    assert json.loads(meta.read_text())["kind"] == "stream"


def test_build_split_returns_lazy_rows_indexed_in_the_cache(tok, tmp_path, monkeypatch):
    cache = tmp_path / "tokens"
    # The token caches of today carry no key yet; give the bundled corpus one to see the index cached.
    import trainer.data.build as build

    real = build.load_corpus
    monkeypatch.setattr(build, "load_corpus", lambda *a, **k: keyed(real(*a, **k), "bundled"))
    cfg = DataConfig(seq_len=64, val_fraction=0.0)
    rows = build_split(cfg, tok, "train", cache).rows
    assert isinstance(rows, RowIndex) and list((cache / ROW_INDEX_DIR).glob("*.meta.json"))
    c = load_source_corpus(DataSource(path=str(BUNDLED_TRAIN), format="jsonl_text"), tok, cfg, cache)
    assert_same(rows, pack_corpus(c, 64, tok.eos_token_id), np.arange(rows.num_rows))


# --------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    # All of it, file pages included: gather reads the memory-mapped corpus with pread, so the pages it
    # touches do not become this process's (through the mapping, each would add up to a 2 MB folio).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_large_corpus_index_and_gather_stay_small(tmp_path):
    """2e8 uint16 tokens (400 MB on disk, ~4.8 GB as pack_corpus rows), as pretraining text (packed and not)
    and as chat: building the index and gathering a 16 x 4096 batch allocate O(documents + batch), not
    O(corpus)."""
    n_tokens, seq_len, batch = 200_000_000, 4096, 16
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, rng.lognormal(np.log(800), 1.0, 400_000).astype(np.int64))
    lengths = lengths[np.cumsum(lengths) <= n_tokens]
    lengths = np.r_[lengths, n_tokens - lengths.sum()]
    path = tmp_path / "tokens.bin"
    with open(path, "wb") as f:  # written in chunks, never mapped: the pages are not ours
        pattern = (np.arange(1 << 22) % 50_021).astype(np.uint16)
        for _ in range(n_tokens // len(pattern)):
            f.write(pattern.tobytes())
        f.write(pattern[:n_tokens % len(pattern)].tobytes())
    with open(tmp_path / "targets.bin", "wb") as f:
        mask = (np.arange(1 << 22) % 3 > 0).tobytes()
        for _ in range(n_tokens // (1 << 22)):
            f.write(mask)
        f.write(mask[:n_tokens % (1 << 22)])
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    offsets = np.cumsum(np.r_[0, lengths])
    corpus = TokenizedCorpus("big", tokens, offsets, key="big-corpus")
    chat = TokenizedCorpus("big chat", tokens, offsets, np.memmap(tmp_path / "targets.bin", dtype=np.bool_, mode="r"),
                           key="big-chat")
    docs = len(lengths)

    rss0 = _rss_bytes()
    tracemalloc.start()
    try:
        for c, pack in ((corpus, True), (corpus, False), (chat, True)):
            index = build_rows(c, seq_len, EOS, packing=pack, cache_dir=tmp_path / "rows")
            for seed in range(8):  # spread over the corpus: 128 rows x (S + 1) tokens from 400 MB
                ids = np.random.default_rng(seed).choice(index.num_rows, batch, replace=False)
                rows = index.gather(ids)
            if c is corpus and pack:  # concatenate-and-chunk from token 0: row r is tokens [r*S, (r+1)*S)
                np.testing.assert_array_equal(rows["input_ids"][0], tokens[ids[0] * seq_len:(ids[0] + 1) * seq_len])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = _rss_bytes() - rss0
    # Some int64 arrays (and BFD's Python lists) per document, a few int64 arrays per slot of the batch.
    bound = 160 * docs + 128 * batch * seq_len
    assert peak < bound < n_tokens // 4, (peak, bound)  # an eighth of the corpus file, 1% of its rows
    # + allocator and tracemalloc slack; reading through the mapping would add ~1.5 MB per row drawn (~500 MB)
    assert grown < bound + (32 << 20), grown


def with_eod(corpus: TokenizedCorpus) -> TokenizedCorpus:
    """The corpus as Megatron's preprocess_data.py --append-eod writes it: EOS after every non-empty document."""
    docs = [np.r_[corpus.doc(i), EOS] if len(corpus.doc(i)) else corpus.doc(i) for i in range(corpus.num_docs)]
    lengths = [len(d) for d in docs]
    tokens = np.concatenate(docs).astype(corpus.tokens.dtype) if docs else corpus.tokens[:0]
    return TokenizedCorpus(corpus.name, tokens, np.cumsum(np.r_[0, lengths]).astype(np.int64), eod=True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("packing_on", [True, False])
def test_documents_ending_in_eos_get_no_second_one(seed, packing_on):
    """A corpus whose documents already end with EOS (eod) packs to exactly the rows of the same documents
    without it: the file's EOS is the last label, never an input followed by another EOS."""
    plain, seq_len = synthetic(seed, sft=False)
    eod = with_eod(plain)
    lo, hi = (0, plain.num_docs) if seed % 2 else (plain.num_docs // 3, plain.num_docs)
    ref = pack_corpus(plain, seq_len, EOS, packing=packing_on, start=lo, stop=hi, sample_id_base=5)
    index = build_rows(eod, seq_len, EOS, packing=packing_on, start=lo, stop=hi, sample_id_base=5)
    for ids in subsets(ref.num_rows, seed):
        assert_same(index, ref, ids)
    alone = pack_corpus(eod, seq_len, EOS, packing=packing_on, start=lo, stop=hi, sample_id_base=5)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(alone, f), getattr(ref, f), err_msg=f)
    if ref.num_rows:  # without the flag the file's EOS would be an input followed by a second EOS
        doubled = build_rows(TokenizedCorpus(eod.name, eod.tokens, eod.offsets), seq_len, EOS, packing=packing_on,
                             start=lo, stop=hi, sample_id_base=5)
        got = doubled.gather(np.arange(doubled.num_rows))["labels"]
        assert got.shape != ref.labels.shape or not np.array_equal(got, ref.labels)
