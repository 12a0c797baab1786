"""Token caches in Megatron's indexed format: written streaming, read memory-mapped (by us and by megatron-core),
keyed cheaply by path/size/mtime (or by content), and external Megatron files' ids checked once."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import megatron_indexed, pretrain
from trainer.data.megatron_indexed import IndexedWriter, read_megatron, token_dtype
from trainer.data.sft import BUNDLED_SFT_VAL, load_sft_corpus
from trainer.data.sources import Source

with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [f"Cached document {i} about {'memory maps' if i % 2 else 'index files'}, {i * 13} words." for i in range(30)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def load(tok, cache, path, fmt="jsonl_text", field="text", **kw):
    return pretrain.load_source_corpus(DataSource(path=str(path), format=fmt, text_field=field), tok,
                                       DataConfig(**kw), cache)


def megatron_core_docs(prefix) -> list[list[int]]:
    ds = indexed.IndexedDataset(str(prefix), mmap=True)
    return [ds[i].tolist() for i in range(len(ds))]


# --------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65_499), (np.int32, 200_000)])
def test_writer_round_trip_read_by_megatron_core(tmp_path, dtype, high):
    rng = np.random.default_rng(high)
    docs = [rng.integers(0, high, size=int(rng.integers(0, 50))) for _ in range(40)]
    prefix = tmp_path / "c"
    with IndexedWriter(prefix, dtype) as w:
        for d in docs:
            w.add(d)
        assert not Path(f"{prefix}.idx").exists()  # nothing published before finalize
    corpus = read_megatron(prefix, vocab_size=high)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.dtype(dtype)
    assert [corpus.doc(i).tolist() for i in range(corpus.num_docs)] == [d.tolist() for d in docs]
    assert megatron_core_docs(prefix) == [d.tolist() for d in docs]
    assert token_dtype(65_499) is np.uint16 and token_dtype(65_500) is np.int32  # Megatron's optimal_dtype


def test_appending_datasets_equals_writing_once(tmp_path):
    docs = [[1, 2, 3], [], [4], [5, 6]]
    for name, part in (("a", docs[:2]), ("b", docs[2:])):
        with IndexedWriter(tmp_path / name, np.uint16) as w:
            for d in part:
                w.add(d)
    with IndexedWriter(tmp_path / "ab", np.uint16) as w:
        w.append_dataset(tmp_path / "a")
        w.append_dataset(tmp_path / "b")
    assert (tmp_path / "ab.bin").read_bytes() == np.array([1, 2, 3, 4, 5, 6], "<u2").tobytes()
    assert megatron_core_docs(tmp_path / "ab") == docs
    with pytest.raises(ConfigError, match=r"a\.idx: token dtype uint16, expected int32"):
        IndexedWriter(tmp_path / "x", np.int32).append_dataset(tmp_path / "a")


def test_text_cache_is_a_megatron_dataset(tmp_path, tok, cache):
    corpus = load(tok, cache, write_jsonl(tmp_path / "c.jsonl", DOCS))
    (bin_path,) = cache.glob("*.bin")
    assert corpus.key == bin_path.stem and isinstance(corpus.tokens, np.memmap)
    assert corpus.tokens.dtype == np.uint16  # the bundled tokenizer has 2048 ids
    expected = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    assert megatron_core_docs(cache / corpus.key) == expected
    assert json.loads((cache / f"{corpus.key}.meta.json").read_text())["bad_rows"] == {}


def test_sft_cache_tokens_and_aligned_targets(tmp_path, tok, cache):
    corpus = load_sft_corpus(DataSource(path=str(BUNDLED_SFT_VAL), format="messages"), tok, DataConfig(), cache)
    stem = cache / corpus.key
    assert isinstance(corpus.targets, np.memmap) and corpus.targets.dtype == np.bool_
    ds, targets = indexed.IndexedDataset(str(stem)), indexed.IndexedDataset(f"{stem}.targets")
    assert targets.index.dtype == np.uint8 and np.array_equal(ds.index.sequence_lengths,
                                                              targets.index.sequence_lengths)
    for i in range(corpus.num_docs):
        assert ds[i].tolist() == corpus.doc(i).tolist()
        assert targets[i].astype(bool).tolist() == corpus.doc_targets(i).tolist()


# ----------------------------------------------------------------------------------------------- keys


def key_of(tok, path: Path, fmt="jsonl_text", field="text", content_hash=False) -> str:
    return pretrain.cache_key(Source("s", (path,), fmt, field), tok, content_hash)


def test_key_follows_size_mtime_field_and_tokenizer_without_reading_files(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    monkeypatch.setattr(pretrain, "_content_hash", lambda *a: pytest.fail("the default key read the file"))
    base = key_of(tok, path)
    assert key_of(tok, path) == base
    assert key_of(tok, path, field="body") != base and key_of(tok, path, fmt="text", field="") != base
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = key_of(tok, path)
    assert touched != base
    path.write_text(path.read_text() + "\n")  # size
    assert key_of(tok, path) not in (base, touched)
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.add_tokens(["<extra_token>"])
    assert key_of(other, path) != key_of(tok, path)
    # Where the file lives is part of the default key: a moved file is tokenized again.
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy2(path, moved)
    assert key_of(tok, moved) != key_of(tok, path)


def test_content_hash_key_is_location_and_mtime_free(tmp_path, tok):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "c.jsonl", DOCS)
    b = tmp_path / "b" / "c.jsonl"
    shutil.copy(a, b)  # a new mtime, the same bytes and name
    assert key_of(tok, a, content_hash=True) == key_of(tok, b, content_hash=True)
    assert key_of(tok, a) != key_of(tok, b)
    b.write_text(a.read_text().replace("Cached", "Cachex"))  # same size, other bytes
    assert key_of(tok, a, content_hash=True) != key_of(tok, b, content_hash=True)


def test_content_hash_is_computed_once_per_process(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    opened = []
    real_open = open

    def counting_open(file, mode="r", *a, **k):
        if Path(file) == path and "b" in mode:
            opened.append(1)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    pretrain._CONTENT_HASHES.clear()
    k1 = key_of(tok, path, content_hash=True)
    k2 = key_of(tok, path, content_hash=True)
    assert k1 == k2 and len(opened) == 1


# --------------------------------------------------------------------------------------- vocab check


def write_megatron(prefix: Path, docs: list[list[int]], dtype=np.int32) -> Path:
    with IndexedWriter(prefix, dtype) as w:
        for d in docs:
            w.add(d)
    return prefix


def test_megatron_vocab_checked_once_then_recorded(tmp_path, tok, cache, monkeypatch):
    prefix = write_megatron(tmp_path / "mg", [[1, 2, 3], [4, 5]])
    scans = []
    real = megatron_indexed.scan_vocab
    monkeypatch.setattr(megatron_indexed, "scan_vocab", lambda *a, **k: scans.append(1) or real(*a, **k))
    first = load(tok, cache, prefix, "megatron")
    assert scans == [1] and first.key and list(cache.glob(f"{first.key}.vocab{len(tok)}.eos*.json"))
    monkeypatch.setattr(megatron_indexed, "scan_vocab", lambda *a, **k: pytest.fail("scanned again"))
    again = load(tok, cache, prefix, "megatron")
    assert again.key == first.key and again.doc(1).tolist() == [4, 5]


def test_megatron_bad_id_raises_the_same_error_from_the_record(tmp_path, tok, cache, monkeypatch):
    bad_id = len(tok) + 7
    prefix = write_megatron(tmp_path / "big", [[1, 2], [3], [4, bad_id, 5]])
    message = rf"big\.bin: token id {bad_id} \(document 2\) is outside the tokenizer's vocabulary of {len(tok)} " \
              rf"ids \(ids in the file span 1\.\.{bad_id}\).*set data.tokenizer"
    with pytest.raises(ConfigError, match=message) as first:
        load(tok, cache, prefix, "megatron")
    monkeypatch.setattr(megatron_indexed, "scan_vocab", lambda *a, **k: pytest.fail("scanned again"))
    with pytest.raises(ConfigError) as again:
        load(tok, cache, prefix, "megatron")
    assert str(again.value) == str(first.value)


def test_scan_streams_through_a_small_buffer(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(rng.integers(1, 30))).tolist() for _ in range(200)]
    docs[150][3] = 5000
    prefix = write_megatron(tmp_path / "s", docs, np.uint16)
    monkeypatch.setattr(megatron_indexed, "_SCAN_BYTES", 64)  # 32 tokens a read: many chunks
    lo = min(min(d) for d in docs)
    with pytest.raises(ConfigError, match=rf"token id 5000 \(document 150\).*span {lo}\.\.5000"):
        read_megatron(prefix, vocab_size=1000)
    assert read_megatron(prefix, vocab_size=5001).num_docs == 200
    # The EOS-at-every-end check of the same pass sees document ends in every chunk.
    ended = [d + [7] for d in docs]
    write_megatron(tmp_path / "e", ended, np.uint16)
    assert read_megatron(tmp_path / "e", vocab_size=5001, eos_id=7).eod
    ended[180][-1] = 8
    write_megatron(tmp_path / "f", ended, np.uint16)
    assert not read_megatron(tmp_path / "f", vocab_size=5001, eos_id=7).eod


@pytest.mark.parametrize("docs, eod", [([[5, 6, 2], [9, 2], [], [2]], True), ([[5, 6, 2], [9, 3]], False),
                                       ([[5, 6], [9]], False), ([[]], False)])
def test_megatron_documents_ending_in_eos_are_found_once(tmp_path, docs, eod):
    """--append-eod files (every non-empty document ends with EOS, id 2 here) are recognised by the one
    vocabulary scan and recorded with it, so the packer does not append a second EOS."""
    from trainer.data.pretrain import read_checked_megatron

    with IndexedWriter(tmp_path / "c", np.uint16) as w:
        for d in docs:
            w.add(d)
    corpus = read_checked_megatron(tmp_path / "c", 16, "c", tmp_path / "cache", eos_id=2)
    assert corpus.eod is eod
    again = read_checked_megatron(tmp_path / "c", 16, "c", tmp_path / "cache", eos_id=2)
    assert again.eod is eod and again.key == corpus.key
    assert read_checked_megatron(tmp_path / "c", 16, "c", tmp_path / "cache", eos_id=None).eod is False
