"""Megatron-LM indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``), read without importing megatron.

The layout is the one megatron-core's ``IndexedDatasetBuilder`` / ``preprocess_data.py`` writes
(megatron/core/datasets/indexed_dataset.py), all little-endian:

    .idx  magic b"MMIDIDX\\x00\\x00" | version u64 (=1) | dtype code u8 | sequence count S u64 |
          document count D u64 | sequence lengths int32[S] | sequence pointers int64[S] (byte offsets
          into .bin) | document indices int64[D] | optional sequence modes int8[S] (multimodal only)
    .bin  the token ids of every sequence back to back, in the dtype named by the code

A "document" is the run of sequences document_indices[i] .. document_indices[i + 1] (D - 1 documents; the
first index is 0). The files are already tokenized, so nothing is cached: the .bin is memory-mapped.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

import numpy as np

from trainer.config import ConfigError
from trainer.data.corpus import TokenizedCorpus

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: code -> numpy dtype (always little-endian on disk).
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def prefix_paths(path: str | Path) -> tuple[Path, Path]:
    """(.idx, .bin) of a prefix; a path that already ends in .bin or .idx is taken as its prefix."""
    p = Path(path).expanduser()
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".idx"), p.with_name(p.name + ".bin")


def _read_index(idx_path: Path) -> tuple[type, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence pointers, document indices) from an .idx file."""
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
    if len(raw) < _HEADER.size:
        raise ConfigError(f"{idx_path}: {len(raw)} bytes, too short for a Megatron index header "
                          f"({_HEADER.size} bytes)")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(raw[:_HEADER.size].tobytes())
    if magic != MAGIC:
        raise ConfigError(f"{idx_path}: not a Megatron indexed dataset index (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ConfigError(f"{idx_path}: index version {version} is not supported (expected {VERSION})")
    if code not in DTYPES:
        raise ConfigError(f"{idx_path}: unknown token dtype code {code}; expected one of {sorted(DTYPES)}")
    dtype = DTYPES[code]
    if not np.issubdtype(dtype, np.integer):
        raise ConfigError(f"{idx_path}: token dtype {np.dtype(dtype).name} is not an integer type")
    body = _HEADER.size + 12 * n_seq + 8 * n_doc
    # The optional int8 sequence modes (multimodal datasets) follow; they do not affect token ids.
    if len(raw) not in (body, body + n_seq):
        raise ConfigError(f"{idx_path}: {len(raw)} bytes, but {n_seq} sequences and {n_doc} document indices "
                          f"need {body} (or {body + n_seq} with sequence modes); the file is truncated or corrupt")
    off = _HEADER.size
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=off)
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise ConfigError(f"{idx_path}: document indices must rise from 0 to the sequence count {n_seq}")
    if np.any(lengths < 0):
        raise ConfigError(f"{idx_path}: negative sequence length at sequence {int(np.argmax(lengths < 0))}")
    return dtype, lengths, pointers, doc_idx


def read_megatron(path: str | Path, vocab_size: Optional[int] = None, name: Optional[str] = None) -> TokenizedCorpus:
    """Documents of a Megatron indexed dataset as a TokenizedCorpus over the memory-mapped .bin.

    ``tokens`` keeps the file's dtype (uint16 or int32 in practice) and is a read-only memmap when the
    sequences lie back to back, as every writer produces them; otherwise they are gathered into memory.
    With ``vocab_size``, every token id is checked to lie in [0, vocab_size).
    """
    idx_path, bin_path = prefix_paths(path)
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise ConfigError(f"Megatron dataset {str(path)!r}: {p} does not exist (expected the prefix of a "
                              f".bin/.idx pair, as written by Megatron's preprocess_data.py)")
    dtype, lengths, pointers, doc_idx = _read_index(idx_path)
    itemsize = np.dtype(dtype).itemsize
    bin_size = bin_path.stat().st_size
    ends = pointers + lengths.astype(np.int64) * itemsize
    if len(lengths) and (pointers.min() < 0 or ends.max() > bin_size or np.any(pointers % itemsize)):
        raise ConfigError(f"{bin_path}: {bin_size} bytes, but {idx_path} points at sequences up to byte "
                          f"{int(ends.max())} (or at unaligned/negative offsets); the .bin and .idx do not match")
    bin_map = (np.memmap(bin_path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if bin_size >= itemsize
               else np.zeros(0, dtype=dtype))

    seq_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    contiguous = len(lengths) == 0 or bool(np.all(pointers[1:] == ends[:-1]))
    if contiguous:
        first = int(pointers[0]) // itemsize if len(lengths) else 0
        tokens = bin_map[first:first + int(seq_starts[-1])]
    else:
        tokens = np.concatenate([bin_map[p // itemsize:p // itemsize + n] for p, n in zip(pointers, lengths)]
                                or [np.zeros(0, dtype=dtype)])
    offsets = seq_starts[doc_idx]  # document i = sequences doc_idx[i] .. doc_idx[i + 1]

    if vocab_size is not None and len(tokens):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = int(np.argmax((tokens < 0) | (tokens >= vocab_size)))
            doc = int(np.searchsorted(offsets, bad, side="right")) - 1
            raise ConfigError(f"{bin_path}: token id {int(tokens[bad])} (document {doc}) is outside the tokenizer's "
                              f"vocabulary of {vocab_size} ids (ids in the file span {lo}..{hi}); the files were "
                              f"made with another tokenizer: set data.tokenizer to it")
    return TokenizedCorpus(name or f"Megatron dataset {str(path)!r}", tokens, offsets)
