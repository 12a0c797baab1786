"""Our Megatron indexed-dataset reader against megatron-core's own writer and reader (CPU, no process group)."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError, DamagedFileError
from trainer.data.megatron_indexed import REMEDY, prefix_paths, read_megatron

with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[list[np.ndarray]]:
    """n documents, each of 1-3 sequences of 0-40 tokens (empty sequences included)."""
    return [[rng.integers(0, high, size=int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(n)]


def build(prefix: str, docs: list[list[np.ndarray]], dtype, via_add_document: bool = False) -> None:
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in docs:
        if via_add_document:  # what preprocess_data.py does: one call per document, its sequence lengths
            builder.add_document(torch.from_numpy(np.concatenate(seqs)), [len(s) for s in seqs])
        else:
            for s in seqs:
                builder.add_item(torch.from_numpy(s))
            builder.end_document()
    builder.finalize(prefix + ".idx")


def reference_docs(prefix: str) -> list[np.ndarray]:
    """Documents as megatron-core's IndexedDataset sees them: the sequences between document indices."""
    ds = indexed.IndexedDataset(prefix, mmap=True)
    di = ds.document_indices
    return [np.concatenate([ds[j] for j in range(di[i], di[i + 1])] or [np.zeros(0, ds.index.dtype)])
            for i in range(len(di) - 1)]


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65_000), (np.int32, 150_000)])
@pytest.mark.parametrize("via_add_document", [False, True])
def test_reader_matches_megatron_core(tmp_path, dtype, high, via_add_document):
    docs = random_docs(np.random.default_rng(high + via_add_document), 25, high)
    prefix = str(tmp_path / "corpus_text_document")
    build(prefix, docs, dtype, via_add_document)

    corpus = read_megatron(prefix, vocab_size=high)
    ref = reference_docs(prefix)
    assert corpus.num_docs == len(ref) == len(docs)
    assert corpus.tokens.dtype == np.dtype(dtype) and isinstance(corpus.tokens, np.memmap)
    for i, seqs in enumerate(docs):
        assert np.array_equal(corpus.doc(i), ref[i])
        assert corpus.doc(i).tolist() == np.concatenate(seqs).tolist()
    # A path with the .bin or .idx suffix means the same prefix.
    assert np.array_equal(read_megatron(prefix + ".bin").offsets, corpus.offsets)


def test_empty_dataset_and_multimodal_modes(tmp_path):
    prefix = str(tmp_path / "empty")
    indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    assert read_megatron(prefix).num_docs == 0

    # Multimodal datasets append one int8 mode per sequence after the document indices.
    prefix = str(tmp_path / "mm")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32, multimodal=True)
    builder.add_item(torch.tensor([1, 2, 3]), mode=1)
    builder.add_item(torch.tensor([4]), mode=0)
    builder.end_document()
    builder.finalize(prefix + ".idx")
    corpus = read_megatron(prefix)
    assert corpus.num_docs == 1 and corpus.doc(0).tolist() == [1, 2, 3, 4]


def test_errors_name_the_file_and_values(tmp_path):
    prefix = str(tmp_path / "c")
    build(prefix, [[np.array([5, 70_000, 9])], [np.array([1])]], np.int32)
    out_of_vocab = r"c\.bin: token id 70000 \(document 0\).*vocabulary of 50000 ids.*1\.\.70000"
    with pytest.raises(ConfigError, match=out_of_vocab):
        read_megatron(prefix, vocab_size=50_000)
    assert read_megatron(prefix, vocab_size=70_001).num_docs == 2

    idx, bin_ = prefix_paths(prefix)
    with pytest.raises(ConfigError, match=r"nope\.idx does not exist"):
        read_megatron(tmp_path / "nope")
    raw = bytearray(idx.read_bytes())
    idx.write_bytes(b"NOTMEGA\x00\x00" + raw[9:])
    with pytest.raises(ConfigError, match=r"c\.idx: not a Megatron indexed dataset index \(magic b'NOTMEGA"):
        read_megatron(prefix)
    idx.write_bytes(bytes(raw[:9]) + struct.pack("<Q", 2) + raw[17:])
    with pytest.raises(ConfigError, match=r"c\.idx: index version 2 is not supported"):
        read_megatron(prefix)
    idx.write_bytes(bytes(raw[:-8]))
    with pytest.raises(ConfigError, match=r"c\.idx: .*truncated or corrupt"):
        read_megatron(prefix)
    idx.write_bytes(bytes(raw))
    bin_.write_bytes(bin_.read_bytes()[:-4])
    with pytest.raises(ConfigError, match=r"c\.bin: 12 bytes.*do not match"):
        read_megatron(prefix)


def test_damaged_pairs_say_what_to_do(tmp_path):
    """Every damaged .idx/.bin is a DamagedFileError (exit 2 in the trainer) that names the file and the fix;
    the sizes are checked when the pair is opened, without reading the tokens."""
    prefix = str(tmp_path / "d")
    build(prefix, [[np.arange(10)], [np.arange(5)]], np.uint16)
    idx, bin_ = prefix_paths(prefix)
    raw, tokens = idx.read_bytes(), bin_.read_bytes()
    damages = [(idx, raw[:10], "too short for a Megatron index header"),
               (idx, b"GARBAGE!!" + raw[9:], "not a Megatron indexed dataset index"),
               (idx, raw[:-3], "truncated or corrupt"),
               (bin_, tokens[:6], "the .bin is truncated")]
    for path, data, needle in damages:
        path.write_bytes(data)
        with pytest.raises(DamagedFileError) as err:
            read_megatron(prefix)
        assert err.value.path == str(path) and needle in str(err.value)
        assert str(err.value).endswith(REMEDY) and "meshtron-preprocess" in REMEDY
        idx.write_bytes(raw)
        bin_.write_bytes(tokens)
    assert read_megatron(prefix).num_docs == 2
