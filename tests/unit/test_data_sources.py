"""Pretraining sources: every format to the same token ids, the cache, bad rows, and the source entry point."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.assets import BUNDLED_TRAIN
from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import pretrain
from trainer.data.build import build_split
from trainer.data.pretrain import data_sources, load_source_corpus, read_source
from trainer.data.sources import Source, resolve_files

DOCS = [f"Source document {i}: {'parquet columns' if i % 3 else 'memory maps'} and {i * 11} tokens.\n"
        f"  Second line {i}." for i in range(12)]


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = pretrain._encode_batch
    monkeypatch.setattr(pretrain, "_encode_batch", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    return calls


def ids(tok, doc: str) -> list[int]:
    return tok(doc, add_special_tokens=False)["input_ids"]


def write_parquet(path: Path, docs: list, field: str = "text", row_group_size: int = 5) -> Path:
    table = pa.table({"id": list(range(len(docs))), field: pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_disk(path: Path, docs: list, field: str = "text") -> Path:
    import datasets
    datasets.Dataset.from_dict({field: docs, "n": list(range(len(docs)))}).save_to_disk(str(path))
    return path


def write_megatron(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> Path:
    """The .bin/.idx layout of megatron-core's IndexedDatasetBuilder, one sequence per document."""
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * itemsize]).astype(np.int64)
    Path(f"{prefix}.bin").write_bytes(np.concatenate([np.asarray(d, dtype) for d in docs]).tobytes())
    code = {np.uint16: 8, np.int32: 4}[dtype]
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1)
    Path(f"{prefix}.idx").write_bytes(header + lengths.tobytes() + pointers.tobytes()
                                      + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    return prefix


def load(tok, cache, path, fmt, field="text", **kw):
    return load_source_corpus(DataSource(path=str(path), format=fmt, text_field=field), tok, DataConfig(**kw), cache)


def as_lists(corpus) -> list[list[int]]:
    return [corpus.doc(i).tolist() for i in range(corpus.num_docs)]


# ------------------------------------------------------------------------------------------ formats


def test_every_format_gives_the_same_token_ids(tmp_path, tok, cache):
    expected = [ids(tok, d) for d in DOCS]
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS), encoding="utf-8")
    write_parquet(tmp_path / "c.parquet", DOCS, "body")
    write_hf_disk(tmp_path / "hf", DOCS, "content")
    write_megatron(tmp_path / "mg_text_document", expected)
    corpora = {
        "text": load(tok, cache, tmp_path / "c.txt", "text"),
        "jsonl_text": load(tok, cache, tmp_path / "c.jsonl", "jsonl_text", "body"),
        "parquet": load(tok, cache, tmp_path / "c.parquet", "parquet", "body"),
        "hf_disk": load(tok, cache, tmp_path / "hf", "hf_disk", "content"),
        "megatron": load(tok, cache, tmp_path / "mg_text_document", "megatron"),
    }
    for fmt, corpus in corpora.items():
        assert as_lists(corpus) == expected, fmt  # documents without EOS: the packer appends it
    assert corpora["megatron"].tokens.dtype == np.uint16


def test_parquet_directory_in_sorted_order_and_custom_field(tmp_path, tok, cache):
    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "b.parquet", DOCS[6:], "content")
    write_parquet(tmp_path / "d" / "a.parquet", DOCS[:6], "content")
    corpus = load(tok, cache, tmp_path / "d", "parquet", "content")
    assert as_lists(corpus) == [ids(tok, d) for d in DOCS]
    no_column = r"a\.parquet: no 'text' column \(data.text_field\); found \['id', 'content'\]"
    with pytest.raises(ConfigError, match=no_column):
        load(tok, cache, tmp_path / "d", "parquet")


def test_whitespace_only_documents_are_skipped_quietly(tmp_path, tok, cache):
    corpus = load(tok, cache, write_parquet(tmp_path / "c.parquet", ["a b", "  \n", "", "c d"]), "parquet")
    assert as_lists(corpus) == [ids(tok, "a b"), ids(tok, "c d")]


def test_hf_disk_dataset_dict_and_plain_directory_errors(tmp_path, tok, cache):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                               "test": datasets.Dataset.from_dict({"text": DOCS[:2]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"saved DatasetDict with splits \['test', 'train'\].*dd/test"):
        load(tok, cache, tmp_path / "dd", "hf_disk")
    assert load(tok, cache, tmp_path / "dd" / "train", "hf_disk").num_docs == len(DOCS)
    with pytest.raises(ConfigError, match="not a datasets.save_to_disk directory"):
        load(tok, cache, tmp_path, "hf_disk")


def test_megatron_rows_and_errors_through_the_config(tmp_path, tok, cache):
    expected = [ids(tok, d) for d in DOCS]
    prefix = write_megatron(tmp_path / "mg", expected, np.int32)
    r = build_split(DataConfig(path=str(prefix), format="megatron", val_fraction=0.0, seq_len=7), tok,
                    "train", cache).rows
    assert r.input_ids.flatten().tolist() == [t for d in expected for t in d][: r.input_ids.size]
    assert r.labels.flatten().tolist() == [t for d in expected for t in d[1:] + [tok.eos_token_id]][: r.labels.size]
    assert not list(cache.glob("*.bin"))  # already tokenized: no token cache (only a vocabulary-check marker)
    with pytest.raises(ConfigError, match=r"data.path=.*nope.*nope\.idx does not exist"):
        load(tok, cache, tmp_path / "nope", "megatron")
    write_megatron(tmp_path / "big", [[1, len(tok) + 5]], np.int32)
    with pytest.raises(ConfigError, match=rf"big\.bin: token id {len(tok) + 5} .*vocabulary of {len(tok)} ids"):
        load(tok, cache, tmp_path / "big", "megatron")


# -------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("fmt", ["parquet", "hf_disk"])
def test_cache_hit_and_invalidation(tmp_path, tok, cache, count_encodes, fmt):
    path = tmp_path / "data"
    write = write_parquet if fmt == "parquet" else write_hf_disk
    first = load(tok, cache, write(path, DOCS), fmt)
    assert sum(count_encodes) == len(DOCS)
    count_encodes.clear()
    assert as_lists(load(tok, cache, path, fmt)) == as_lists(first) and count_encodes == []
    if fmt == "hf_disk":
        import shutil
        shutil.rmtree(path)
    write(path, ["A changed first document."] + DOCS[1:])
    changed = load(tok, cache, path, fmt)
    assert sum(count_encodes) == len(DOCS) and as_lists(changed)[1:] == as_lists(first)[1:]
    assert as_lists(changed)[0] != as_lists(first)[0]
    assert not list(cache.glob("*.tmp"))


# ----------------------------------------------------------------------------------------- bad rows


def test_bad_rows_error_names_file_and_line(tmp_path, tok, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}:2: field 'text' is null, expected a string.*on_bad_row=skip"):
        load(tok, cache, path, "jsonl_text")
    pq_path = write_parquet(tmp_path / "bad.parquet", ["ok", "fine", None, "also"], row_group_size=2)
    with pytest.raises(ConfigError, match=rf"{pq_path}: row 2: field 'text' is null"):
        load(tok, cache, pq_path, "parquet")


def test_skip_counts_bad_rows_per_file_and_remembers_them(tmp_path, tok, cache, caplog, count_encodes):
    (tmp_path / "d").mkdir()
    a, b = tmp_path / "d" / "a.jsonl", tmp_path / "d" / "b.jsonl"
    a.write_text('{"text": "one"}\n{"text": broken\n[1, 2]\n{"text": 5}\n{"text": "two"}\n', encoding="utf-8")
    b.write_text('{"text": "three"}\n', encoding="utf-8")
    source = Source("t", resolve_files(str(tmp_path / "d"), "jsonl_text", "data.path"), "jsonl_text", "text")
    corpus, bad = read_source(source, tok, cache, "skip")
    assert as_lists(corpus) == [ids(tok, "one"), ids(tok, "two"), ids(tok, "three")]
    assert bad == {str(a): 3}
    count_encodes.clear()
    assert read_source(source, tok, cache, "skip")[1] == {str(a): 3} and count_encodes == []  # cache hit

    with caplog.at_level(logging.WARNING, logger="trainer.data.pretrain"):
        load(tok, cache, tmp_path / "d", "jsonl_text", on_bad_row="skip")
    assert f"skipped 3 bad rows in {a}" in caplog.text
    # The skip-mode cache entry does not let the error policy pass silently.
    with pytest.raises(ConfigError, match=rf"{a}:2: invalid JSON"):
        load(tok, cache, tmp_path / "d", "jsonl_text")


def test_skip_in_parquet_and_hf_disk(tmp_path, tok, cache):
    rows = ["one", None, "two", None]
    _, bad = read_source(Source("p", (write_parquet(tmp_path / "p.parquet", rows),), "parquet", "text"),
                         tok, cache, "skip")
    assert bad == {str(tmp_path / "p.parquet"): 2}
    hf = write_hf_disk(tmp_path / "hf", rows)
    corpus, bad = read_source(Source("h", (hf,), "hf_disk", "text"), tok, cache, "skip")
    assert bad == {str(hf): 2} and as_lists(corpus) == [ids(tok, "one"), ids(tok, "two")]
    with pytest.raises(ConfigError, match=rf"{hf}: row 1: field 'text' is null"):
        load(tok, cache, hf, "hf_disk")


# ------------------------------------------------------------------------------------ source entry


def test_data_sources_shortcut_bundled_and_blend():
    (bundled,) = data_sources(DataConfig())
    assert Path(bundled.path) == BUNDLED_TRAIN and bundled.format == "jsonl_text"
    (one,) = data_sources(DataConfig(path="/x.parquet", format="parquet", text_field="body"))
    assert (one.path, one.format, one.text_field, one.weight) == ("/x.parquet", "parquet", "body", 1.0)
    blend = [DataSource(path="/a", weight=2.0), DataSource(path="/b", format="megatron")]
    assert data_sources(DataConfig(path="/ignored", sources=blend)) == blend


def test_sft_format_is_not_a_pretraining_source(tmp_path, tok, cache):
    with pytest.raises(ConfigError, match="'messages' is not a pretraining format"):
        load(tok, cache, tmp_path, "messages")


def test_bundled_source_is_named_as_such(tok, cache):
    corpus = load_source_corpus(data_sources(DataConfig())[0], tok, DataConfig(), cache)
    assert corpus.name == "the bundled train.jsonl" and corpus.num_docs > 100
    assert build_split(DataConfig(), tok, "train", cache).rows.name == "the bundled train.jsonl"


@pytest.mark.parametrize("fmt, package", [("hf_disk", "datasets"), ("parquet", "pyarrow")])
def test_a_format_whose_reader_is_not_installed_is_named_in_one_line(tmp_path, tok, cache, monkeypatch, fmt,
                                                                     package):
    """datasets and pyarrow are needed only by the formats that read with them: a minimal install (the GPU
    machine's) refuses those formats naming the package, and trains on the others."""
    path = write_hf_disk(tmp_path / "hf", DOCS) if fmt == "hf_disk" else write_parquet(tmp_path / "c.parquet", DOCS)
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, package, None)  # import fails and find_spec is None, as when not installed
    with pytest.raises(ConfigError, match=rf"data.format={fmt} is read with the {package} package, which is not "
                                          rf"installed; pip install {package}"):
        load(tok, cache, path, fmt)
    assert load(tok, cache, tmp_path / "c.txt", "text").num_docs == len(DOCS)
