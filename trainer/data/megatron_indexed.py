"""Megatron-LM indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``), read without importing megatron.

The layout is the one megatron-core's ``IndexedDatasetBuilder`` / ``preprocess_data.py`` writes
(megatron/core/datasets/indexed_dataset.py), all little-endian:

    .idx  magic b"MMIDIDX\\x00\\x00" | version u64 (=1) | dtype code u8 | sequence count S u64 |
          document count D u64 | sequence lengths int32[S] | sequence pointers int64[S] (byte offsets
          into .bin) | document indices int64[D] | optional sequence modes int8[S] (multimodal only)
    .bin  the token ids of every sequence back to back, in the dtype named by the code

A "document" is the run of sequences document_indices[i] .. document_indices[i + 1] (D - 1 documents; the
first index is 0). The .bin is memory-mapped, never read whole.

meshtron's own token caches and ``python -m trainer.data.preprocess`` write this layout too
(:class:`IndexedWriter`: one sequence per document, streamed to disk, published atomically), so megatron-core
reads our files and we read theirs. The vocabulary range check (:func:`scan_vocab`) streams the .bin through a
fixed buffer: pages touched through a memmap would stay in the process' RSS.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

from trainer.errors import ConfigError, DamagedFileError
from trainer.data.corpus import TokenizedCorpus

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: code -> numpy dtype (always little-endian on disk).
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_SCAN_BYTES = 1 << 24  # the vocabulary scan's read buffer
_COPY_BYTES = 1 << 22
# What to do about a damaged pair; a token cache (meshtron's own files) is rebuilt when it is missing.
REMEDY = ("re-create the .bin/.idx pair (Megatron's preprocess_data.py or meshtron-preprocess); a token cache "
          "under data.cache_dir can simply be deleted and is rebuilt")


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice (DType.optimal_dtype): uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


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
        raise DamagedFileError(idx_path, f"{len(raw)} bytes, too short for a Megatron index header "
                                         f"({_HEADER.size} bytes)", REMEDY)
    magic, version, code, n_seq, n_doc = _HEADER.unpack(raw[:_HEADER.size].tobytes())
    if magic != MAGIC:
        raise DamagedFileError(idx_path, f"not a Megatron indexed dataset index (magic {magic!r}, expected "
                                         f"{MAGIC!r})", REMEDY)
    if version != VERSION:
        raise ConfigError(f"{idx_path}: index version {version} is not supported (expected {VERSION})")
    if code not in DTYPES:
        raise DamagedFileError(idx_path, f"unknown token dtype code {code} (expected one of {sorted(DTYPES)})",
                               REMEDY)
    dtype = DTYPES[code]
    if not np.issubdtype(dtype, np.integer):
        raise ConfigError(f"{idx_path}: token dtype {np.dtype(dtype).name} is not an integer type")
    body = _HEADER.size + 12 * n_seq + 8 * n_doc
    # The optional int8 sequence modes (multimodal datasets) follow; they do not affect token ids.
    if len(raw) not in (body, body + n_seq):
        raise DamagedFileError(idx_path, f"{len(raw)} bytes, but {n_seq} sequences and {n_doc} document indices "
                                         f"need {body} (or {body + n_seq} with sequence modes): the file is "
                                         f"truncated or corrupt", REMEDY)
    off = _HEADER.size
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=off)
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise DamagedFileError(idx_path, f"document indices do not rise from 0 to the sequence count {n_seq}",
                               REMEDY)
    if np.any(lengths < 0):
        raise DamagedFileError(idx_path, f"negative sequence length at sequence {int(np.argmax(lengths < 0))}",
                               REMEDY)
    return dtype, lengths, pointers, doc_idx


def read_megatron(path: str | Path, vocab_size: Optional[int] = None, name: Optional[str] = None,
                  eos_id: Optional[int] = None) -> TokenizedCorpus:
    """Documents of a Megatron indexed dataset as a TokenizedCorpus over the memory-mapped .bin.

    ``tokens`` keeps the file's dtype (uint16 or int32 in practice) and is a read-only memmap when the
    sequences lie back to back, as every writer produces them; otherwise they are gathered into memory.
    With ``vocab_size``, every token id is checked to lie in [0, vocab_size) (:func:`scan_vocab`); the
    trainer does that once per file and vocabulary and records it (pretrain.py), not on every start. The same
    pass sets ``eod`` when ``eos_id`` ends every non-empty document (Megatron's ``--append-eod``).
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
        raise DamagedFileError(bin_path, f"{bin_size} bytes, but {idx_path.name} points at sequences up to byte "
                                         f"{int(ends.max())} (or at unaligned/negative offsets): the .bin is "
                                         f"truncated or the .bin and .idx do not match", REMEDY)
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

    eod = False
    if vocab_size is not None:
        first = int(pointers[0]) if contiguous and len(lengths) else 0
        eod = scan_vocab(bin_path, dtype, offsets, vocab_size, first_byte=first,
                         tokens=None if contiguous else tokens, eos_id=eos_id)
    return TokenizedCorpus(name or f"Megatron dataset {str(path)!r}", tokens, offsets, eod=eod)


# --------------------------------------------------------------------------------- vocabulary check


def _vocab_error(bin_path: Path, token: int, doc: int, vocab_size: int, lo: int, hi: int) -> ConfigError:
    return ConfigError(f"{bin_path}: token id {token} (document {doc}) is outside the tokenizer's vocabulary of "
                       f"{vocab_size} ids (ids in the file span {lo}..{hi}); the files were made with another "
                       f"tokenizer: set data.tokenizer to it")


def scan_vocab(bin_path: Path, dtype: type, offsets: np.ndarray, vocab_size: int, first_byte: int = 0,
               tokens: Optional[np.ndarray] = None, eos_id: Optional[int] = None) -> bool:
    """Raise a ConfigError naming the first token id outside [0, vocab_size), its document and the file's id
    range. Reads the ``offsets[-1]`` tokens from ``first_byte`` of the .bin into one fixed buffer (bounded
    RSS); ``tokens`` (already in memory: non-contiguous sequences) is checked instead when given.

    Returns whether ``eos_id`` is the last token of every non-empty document (and there is one), checked in
    the same pass: Megatron's preprocess_data.py --append-eod ends each document with the EOD token."""
    dt = np.dtype(dtype).newbyteorder("<")
    total = int(offsets[-1]) if len(offsets) else 0
    lasts = (offsets[1:] - 1)[offsets[1:] > offsets[:-1]].astype(np.int64)  # last token of each document
    lo, hi, bad, eod = None, None, None, eos_id is not None and len(lasts) > 0

    def check(chunk: np.ndarray, base: int) -> None:
        nonlocal lo, hi, bad, eod
        if not len(chunk):
            return
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo, hi = cmin if lo is None else min(lo, cmin), cmax if hi is None else max(hi, cmax)
        if bad is None and (cmin < 0 or cmax >= vocab_size):
            at = int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
            bad = (base + at, int(chunk[at]))
        if eod:
            here = lasts[np.searchsorted(lasts, base):np.searchsorted(lasts, base + len(chunk))] - base
            eod = bool(np.all(chunk[here] == eos_id))

    if tokens is not None:
        check(np.asarray(tokens), 0)
    else:
        buf = np.empty(max(1, _SCAN_BYTES // dt.itemsize), dtype=dt)
        with open(bin_path, "rb") as f:
            f.seek(first_byte)
            done = 0
            while done < total:
                want = min(len(buf), total - done)
                got = f.readinto(memoryview(buf[:want]).cast("B")) // dt.itemsize
                if got <= 0:
                    raise DamagedFileError(bin_path, f"ends after {done} of the {total} tokens its index lists",
                                           REMEDY)
                check(buf[:got], done)
                done += got
    if bad is not None:
        doc = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        raise _vocab_error(bin_path, bad[1], doc, vocab_size, lo, hi)
    return eod


# ------------------------------------------------------------------------------------------- writing


def _fsync_replace(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o644)  # readable by the other users of a shared cache
    os.replace(tmp, path)


class IndexedWriter:
    """Stream documents into ``<prefix>.bin``/``.idx`` (one sequence per document, as preprocess_data.py
    writes them without sentence splitting). Nothing is visible under the final names until
    :meth:`finalize`, which publishes the .bin and then the .idx: a reader that finds the .idx finds both.
    Holds 12 bytes per document in memory (lengths), as megatron-core's builder does."""

    def __init__(self, prefix: str | Path, dtype: type):
        # Suffixes appended, not swapped: "<key>.targets" is a prefix of its own.
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        self.code = CODES[np.dtype(dtype)]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._tmp_bin = self.bin_path.with_name(f"{self.bin_path.name}.{os.getpid()}.tmp")
        self._bin: Optional[BinaryIO] = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._pending: list[int] = []

    def add(self, ids) -> None:
        """One document's ids (any integer sequence); the caller guarantees they fit the dtype."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self._pending.append(len(arr))
        if len(self._pending) >= 65536:
            self._flush_lengths()

    def _flush_lengths(self) -> None:
        if self._pending:
            self._lengths.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []

    def append_dataset(self, prefix: str | Path) -> None:
        """Every document of another indexed dataset of the same dtype, copied in bounded chunks (merging
        parts written by several processes)."""
        idx_path, bin_path = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
        dtype, lengths, pointers, doc_idx = _read_index(idx_path)
        if CODES[np.dtype(dtype)] != self.code:
            raise ConfigError(f"{idx_path}: token dtype {np.dtype(dtype).name}, expected {self.dtype.name}")
        if len(doc_idx) != len(lengths) + 1:
            raise ConfigError(f"{idx_path}: not one sequence per document; cannot append it")
        self._flush_lengths()
        with open(bin_path, "rb") as f:
            shutil.copyfileobj(f, self._bin, _COPY_BYTES)
        self._lengths.append(np.array(lengths, dtype=np.int32))

    def finalize(self) -> None:
        self._flush_lengths()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._bin = None
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        tmp_idx = self.idx_path.with_name(f"{self.idx_path.name}.{os.getpid()}.tmp")
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self.code, len(lengths), len(lengths) + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(self._tmp_bin, self.bin_path)
        _fsync_replace(tmp_idx, self.idx_path)

    def abort(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._bin = None
        self._tmp_bin.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()
        elif self._bin is not None:
            self.finalize()
