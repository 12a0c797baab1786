"""Packed rows as a small index over the memory-mapped corpus; token rows are built only when a batch is drawn.

``pack_corpus`` (packing.py) materializes all five fields of every row: tens of GB per rank for a 1e9-token
corpus. A :class:`RowIndex` keeps only O(documents) integers that say where each row's pieces lie in the
corpus, and ``gather(row_ids)`` builds the rows asked for, bit-identical to pack_corpus' (same rules: see
packing.py), reading only their tokens from the memory-mapped corpus.

The index, by kind (S = seq_len):

- ``stream`` (pretraining, packing): ``ends``, the prefix sums of the slot counts of the span's non-empty
  documents, and ``docs``, their corpus indices. Row r is stream positions [r*S, (r+1)*S); its pieces are
  found with searchsorted. Empty documents are left out, so a row never has more than S pieces to visit.
- ``chunks`` (pretraining, no packing): ``chunk_ends``, prefix sums of ceil(n / S) per document of the span.
- ``plan`` (SFT): the best-fit-decreasing plan (or one conversation per row) in CSR form: row r holds
  conversations ``docs[row_ptr[r]:row_ptr[r + 1]]`` at ``offsets[...]``, in offset order. BFD is a Python
  loop over conversations, the one part worth caching.

Built with vectorized numpy (BFD aside). With ``cache_dir`` and a corpus key, the arrays are saved as .npy
files under a key of everything that decides the rows and read back with ``mmap_mode="r"``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from trainer.data import packing
from trainer.data.corpus import TokenizedCorpus
from trainer.data.packing import IGNORE_INDEX, PAD_DOC, PackedRows, check_pack_args, select_conversations
from trainer.data.pretrain import save_npy_atomic, write_atomic
from trainer.errors import ConfigError

# Bump when the index layout or a packing rule changes, so stale indices are never read.
INDEX_VERSION = 1
_ARRAYS = {"stream": ("ends", "docs"), "chunks": ("chunk_ends",), "plan": ("row_ptr", "docs", "offsets")}


def _whole(name: str) -> property:
    def get(self) -> np.ndarray:
        return self.gather(np.arange(self.num_rows))[name]
    # For tests and small data: materializes every row of the field (O(corpus)).
    return property(get, doc=f"{name} of every row, [num_rows, seq_len] (materializes them all)")


class LazyRows:
    """The PackedRows interface over rows built on demand: subclasses set name, seq_len, num_rows, real_slots,
    truncated, dropped and implement gather()."""

    FIELDS = PackedRows.FIELDS
    name: str
    seq_len: int
    num_rows: int
    real_slots: int
    truncated: int
    dropped: int

    def gather(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def efficiency(self) -> float:
        """Real (non-padding) slots over all slots, from the index (no row is built)."""
        total = self.num_rows * self.seq_len
        return self.real_slots / total if total else 0.0

    def stats(self) -> dict[str, float]:
        return {"rows": self.num_rows, "efficiency": self.efficiency, "truncated": self.truncated,
                "dropped": self.dropped}

    def materialize(self) -> PackedRows:
        return PackedRows(self.name, **self.gather(np.arange(self.num_rows)), truncated=self.truncated,
                          dropped=self.dropped)

    input_ids = _whole("input_ids")
    labels = _whole("labels")
    position_ids = _whole("position_ids")
    document_ids = _whole("document_ids")
    sample_ids = _whole("sample_ids")

    def _check_ids(self, row_ids) -> np.ndarray:
        ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_rows):
            bad = int(ids[(ids < 0) | (ids >= self.num_rows)][0])
            raise IndexError(f"row {bad} is outside {self.name}'s {self.num_rows} rows")
        return ids


# ------------------------------------------------------------------------------------------ building


def _pretrain_slots(corpus: TokenizedCorpus, lo: int, hi: int) -> np.ndarray:
    """Slots per document: n tokens + the appended EOS = n slots; a document that already ends with that EOS
    (corpus.eod) has one token fewer of its own."""
    n = np.diff(corpus.offsets[lo:hi + 1]).astype(np.int64)
    return np.maximum(n - 1, 0) if corpus.eod else n


def _stream_index(corpus: TokenizedCorpus, lo: int, hi: int, seq_len: int) -> tuple[dict, int, int]:
    n_slots = _pretrain_slots(corpus, lo, hi)
    docs = lo + np.flatnonzero(n_slots)
    ends = np.cumsum(n_slots[docs - lo])
    num_rows = int(ends[-1]) // seq_len if len(ends) else 0
    return {"ends": ends, "docs": docs}, num_rows, num_rows * seq_len


def _chunks_index(corpus: TokenizedCorpus, lo: int, hi: int, seq_len: int) -> tuple[dict, int, int]:
    n_slots = _pretrain_slots(corpus, lo, hi)
    chunk_ends = np.cumsum(-(-n_slots // seq_len))
    return {"chunk_ends": chunk_ends}, int(chunk_ends[-1]) if len(chunk_ends) else 0, int(n_slots.sum())


def _plan_index(corpus: TokenizedCorpus, lo: int, hi: int, seq_len: int, packing_on: bool,
                overlong: str) -> tuple[dict, int, int, int, int]:
    n_tokens = np.diff(corpus.offsets[lo:hi + 1]).astype(np.int64)
    keep, n_tokens, truncated, dropped = select_conversations(n_tokens, lo, seq_len, overlong, corpus.name)
    docs, size = lo + np.flatnonzero(keep), n_tokens[keep] - 1
    if packing_on:
        row, offset, num_rows = packing.best_fit_decreasing(size, seq_len)
    else:
        row, offset, num_rows = np.arange(len(size)), np.zeros(len(size), np.int64), len(size)
    order = np.lexsort((offset, row))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=num_rows))]).astype(np.int64)
    arrays = {"row_ptr": row_ptr, "docs": docs[order], "offsets": offset[order].astype(np.int64)}
    return arrays, num_rows, int(size.sum()), truncated, dropped


def _pair_plan_index(corpus: TokenizedCorpus, lo: int, hi: int, seq_len: int,
                     packing_on: bool) -> tuple[dict, int, int, int, int]:
    """A preference corpus' plan: pair i (documents 2i, 2i + 1) is one item of len(chosen) - 1 +
    len(rejected) - 1 slots, packed whole by best-fit decreasing (or one pair per row), the chosen document
    first and the rejected one right after it in the same row. Overlong pairs were fitted at tokenization."""
    n_tokens = np.diff(corpus.offsets[lo:hi + 1]).astype(np.int64)
    chosen, rejected = n_tokens[0::2] - 1, n_tokens[1::2] - 1
    size = chosen + rejected
    if len(size) and size.max() > seq_len:
        raise ConfigError(f"{corpus.name}: pair {lo // 2 + int(np.argmax(size))} fills {int(size.max())} slots, "
                          f"more than data.seq_len={seq_len}; its token cache was made for a longer data.seq_len "
                          f"(delete the cache entry to rebuild it)")
    if packing_on:
        row, offset, num_rows = packing.best_fit_decreasing(size, seq_len)
    else:
        row, offset, num_rows = np.arange(len(size)), np.zeros(len(size), np.int64), len(size)
    docs = lo + np.arange(2 * len(size), dtype=np.int64)
    doc_row, doc_offset = np.repeat(row, 2), np.stack([offset, offset + chosen], axis=1).reshape(-1)
    order = np.lexsort((doc_offset, doc_row))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(doc_row, minlength=num_rows))]).astype(np.int64)
    arrays = {"row_ptr": row_ptr, "docs": docs[order], "offsets": doc_offset[order].astype(np.int64)}
    return arrays, num_rows, int(size.sum()), 0, 0


def index_key(corpus: TokenizedCorpus, seq_len: int, eos_id: Optional[int], packing_on: bool, overlong: str,
              sample_id_base: int, span: tuple[int, int]) -> str:
    sft = corpus.targets is not None
    text = (f"rows-v{INDEX_VERSION}|{corpus.key}|sft={sft}|pairs={corpus.pairs}|S={seq_len}|packing={packing_on}|overlong={overlong}|"
            f"span={span[0]}:{span[1]}|eos={eos_id}|base={sample_id_base}|eod={corpus.eod}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_index(stem: Path, kind: str) -> Optional[tuple[dict, dict]]:
    meta_path = Path(f"{stem}.meta.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arrays = {a: np.load(f"{stem}.{a}.npy", mmap_mode="r", allow_pickle=False) for a in _ARRAYS[kind]}
        lengths_ok = all(arrays[a].ndim == 1 and len(arrays[a]) == meta["lengths"][a] for a in arrays)
    except (ValueError, OSError, KeyError, TypeError):
        return None  # unreadable or partial: rebuild and overwrite
    if meta.get("kind") != kind or not lengths_ok:
        return None
    return arrays, meta


def _save_index(stem: Path, arrays: dict, meta: dict) -> None:
    # Concurrent ranks may write the same entry: every file is renamed into place whole, the contents are
    # identical, and the meta, which marks the entry complete, comes last.
    for a, arr in arrays.items():
        save_npy_atomic(Path(f"{stem}.{a}.npy"), np.ascontiguousarray(arr))
    text = json.dumps({**meta, "lengths": {a: len(arr) for a, arr in arrays.items()}}, indent=1).encode()
    write_atomic(Path(f"{stem}.meta.json"), lambda f: f.write(text))


def _kind(corpus: TokenizedCorpus, packing_on: bool) -> str:
    return "plan" if corpus.targets is not None else ("stream" if packing_on else "chunks")


def _build(corpus: TokenizedCorpus, seq_len: int, packing_on: bool, overlong: str, lo: int,
           hi: int) -> tuple[dict, dict]:
    kind = _kind(corpus, packing_on)
    if kind == "plan" and corpus.pairs:
        arrays, num_rows, real, truncated, dropped = _pair_plan_index(corpus, lo, hi, seq_len, packing_on)
    elif kind == "plan":
        arrays, num_rows, real, truncated, dropped = _plan_index(corpus, lo, hi, seq_len, packing_on, overlong)
    else:
        build = _stream_index if kind == "stream" else _chunks_index
        (arrays, num_rows, real), truncated, dropped = build(corpus, lo, hi, seq_len), 0, 0
    meta = {"version": INDEX_VERSION, "kind": kind, "num_rows": num_rows, "real_slots": real,
            "truncated": truncated, "dropped": dropped}
    return arrays, meta


def build_rows(corpus: TokenizedCorpus, seq_len: int, eos_id: Optional[int], packing: bool = True,
               overlong: str = "truncate", sample_id_base: int = 0, start: int = 0, stop: Optional[int] = None,
               cache_dir: Optional[Path] = None) -> "RowIndex":
    """The rows pack_corpus would give for the same arguments, as a RowIndex.

    With ``cache_dir`` and ``corpus.key`` set, the index is read from (or saved to) ``cache_dir``; without
    a key it is built in memory every time.
    """
    stop = check_pack_args(corpus, seq_len, eos_id, overlong, start, stop)
    eos = None if corpus.targets is not None else eos_id  # conversations end with their own end-of-turn
    kind = _kind(corpus, packing)
    loaded, stem = None, None
    if cache_dir is not None and corpus.key is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        stem = Path(cache_dir) / index_key(corpus, seq_len, eos, packing, overlong, sample_id_base, (start, stop))
        loaded = _load_index(stem, kind)
    if loaded is None:
        arrays, meta = _build(corpus, seq_len, packing, overlong, start, stop)
        if stem is not None:
            _save_index(stem, arrays, meta)
            loaded = _load_index(stem, kind)
            assert loaded is not None, f"row index {stem}.* unreadable right after writing it"
        else:
            loaded = arrays, meta
    arrays, meta = loaded
    return RowIndex(corpus.name, seq_len, int(meta["num_rows"]), int(meta["real_slots"]), int(meta["truncated"]),
                    int(meta["dropped"]), kind, arrays, corpus, eos, sample_id_base, (start, stop))


# ------------------------------------------------------------------------------------------ gathering


def _file_position(a: np.ndarray) -> Optional[tuple[str, int]]:
    """(file, byte offset of a[0]) when ``a`` is a contiguous 1-D view of an np.memmap, else None."""
    if not isinstance(a, np.memmap) or a.filename is None or a.ndim != 1 or a.strides[0] != a.itemsize:
        return None
    root = a  # the array np.memmap made over the mmap; its .offset is the file offset of its first element
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, mmap.mmap) or not isinstance(root, np.memmap):
        return None
    return str(a.filename), root.offset + (a.ctypes.data - root.ctypes.data)


def read_runs(a: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """a[starts[i]:starts[i] + lengths[i]] for every i, concatenated.

    A memory-mapped ``a`` is read with pread, not through the mapping: every page touched through a mapping
    stays in this process's RSS (on this kernel a 2 MB page-cache folio per random 8 KB read, so a long run's
    RSS grows toward the corpus size), while pread copies just the bytes asked for.
    """
    out = np.empty(int(lengths.sum()), a.dtype)
    where = _file_position(a)
    if where is None:  # in memory: plain indexing
        owner = np.repeat(np.arange(len(lengths)), lengths)
        return a[starts[owner] + np.arange(len(out)) - np.repeat(np.cumsum(lengths) - lengths, lengths)]
    path, base = where
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 0
        for start, n in zip(starts.tolist(), lengths.tolist()):
            want = n * a.itemsize
            if os.preadv(fd, [memoryview(out[at:at + n]).cast("B")], base + start * a.itemsize) != want:
                raise OSError(f"{path}: short read of {want} bytes at {base + start * a.itemsize}; the file "
                              f"changed under the run")
            at += n
    finally:
        os.close(fd)
    return out


def _write(n: int, seq_len: int, corpus: TokenizedCorpus, eos_id: Optional[int], row: np.ndarray,
           offset: np.ndarray, src: np.ndarray, length: np.ndarray, end: np.ndarray, sample: np.ndarray,
           rank: np.ndarray) -> dict[str, np.ndarray]:
    """Rows [n, seq_len] from pieces: piece p is ``length[p]`` slots at (row[p], offset[p]) whose inputs are
    corpus tokens from ``src[p]``; its document ends at token ``end[p]``, past which the label is EOS
    (pretraining). ``rank[p]`` is its document id within the row."""
    shape = (n, seq_len)
    out = {"input_ids": np.zeros(shape, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
           "position_ids": np.zeros(shape, np.int32), "document_ids": np.full(shape, PAD_DOC, np.int32),
           "sample_ids": np.full(shape, PAD_DOC, np.int64)}
    if not len(length):
        return out
    # Piece p needs tokens [src, src + length]: its inputs and the token after the last (its label). A piece
    # that starts where the previous one's inputs end (the stream's next document or row) shares its read.
    need_end = np.minimum(src + length + 1, len(corpus.tokens))
    first = np.r_[True, src[1:] != src[:-1] + length[:-1]]
    group = np.cumsum(first) - 1
    g_start = src[first]
    g_len = need_end[np.r_[np.flatnonzero(first)[1:] - 1, len(src) - 1]] - g_start
    at = (np.cumsum(g_len) - g_len)[group] + src - g_start[group]  # piece start in the read buffer
    tokens = read_runs(corpus.tokens, g_start, g_len)

    piece = np.repeat(np.arange(len(length)), length)
    j = np.arange(piece.size) - np.repeat(np.cumsum(length) - length, length)
    here = at[piece] + j
    nxt = np.minimum(here + 1, len(tokens) - 1)  # clipped only where the label is past the document anyway
    labels = tokens[nxt].astype(np.int64)
    if corpus.targets is not None:
        labels = np.where(read_runs(corpus.targets, g_start, g_len)[nxt], labels, IGNORE_INDEX)
    labels = np.where(src[piece] + j + 1 < end[piece], labels, IGNORE_INDEX if eos_id is None else eos_id)
    dst = row[piece] * seq_len + offset[piece] + j
    for name, values in (("input_ids", tokens[here]), ("labels", labels), ("position_ids", j),
                         ("document_ids", rank[piece]), ("sample_ids", sample[piece])):
        out[name].reshape(-1)[dst] = values
    return out


def _ragged(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs first[i] .. first[i] + count[i] - 1, flattened: (run i, first[i] + k, k) for each element."""
    owner = np.repeat(np.arange(len(count)), count)
    k = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    return owner, first[owner] + k, k


@dataclass(eq=False)
class RowIndex(LazyRows):
    """Packed rows of one corpus span as an index (see the module docstring); rows are built by gather()."""

    name: str
    seq_len: int
    num_rows: int
    real_slots: int
    truncated: int
    dropped: int
    kind: str  # "stream" | "chunks" | "plan"
    arrays: dict[str, np.ndarray] = field(repr=False)
    corpus: TokenizedCorpus = field(repr=False)
    eos_id: Optional[int] = None
    sample_id_base: int = 0
    span: tuple[int, int] = (0, 0)

    def gather(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every field of the rows ``row_ids``, [len(row_ids), seq_len], as pack_corpus' rows would hold
        them. Reads only these rows' tokens; O(len(row_ids) * seq_len) memory."""
        ids = self._check_ids(row_ids)
        pieces = {"stream": self._stream_pieces, "chunks": self._chunk_pieces, "plan": self._plan_pieces}[self.kind]
        return _write(len(ids), self.seq_len, self.corpus, self.eos_id, *pieces(ids))

    def _stream_pieces(self, ids: np.ndarray):
        ends, docs, S = self.arrays["ends"], self.arrays["docs"], self.seq_len
        t0 = ids * S  # stream coordinates: position p is corpus token offsets[span start] + p
        first = np.searchsorted(ends, t0, side="right")  # the document holding slot t0
        last = np.searchsorted(ends, t0 + S - 1, side="right")
        row, k, rank = _ragged(first, last - first + 1)
        doc_end = ends[k].astype(np.int64)
        doc_start = np.where(k > 0, ends[np.maximum(k - 1, 0)], 0).astype(np.int64)
        start, stop = np.maximum(doc_start, t0[row]), np.minimum(doc_end, t0[row] + S)
        # Stream -> corpus tokens per document: with corpus.eod each document's own EOS is not in the stream.
        doc_tok = self.corpus.offsets[docs[k]].astype(np.int64) - doc_start
        return (row, start - t0[row], doc_tok + start, stop - start, doc_tok + doc_end,
                self.sample_id_base + docs[k], rank)

    def _chunk_pieces(self, ids: np.ndarray):
        chunk_ends, S = self.arrays["chunk_ends"], self.seq_len
        d = np.searchsorted(chunk_ends, ids, side="right")  # empty documents own no chunk
        first_chunk = np.where(d > 0, chunk_ends[np.maximum(d - 1, 0)], 0)
        k = ids - first_chunk
        doc = self.span[0] + d
        doc_start = self.corpus.offsets[doc].astype(np.int64)
        doc_end = self.corpus.offsets[doc + 1].astype(np.int64) - int(self.corpus.eod)
        src = doc_start + k * S
        zeros = np.zeros(len(ids), np.int64)
        return (np.arange(len(ids)), zeros, src, np.minimum(S, doc_end - src), doc_end,
                self.sample_id_base + doc, zeros)

    def _plan_pieces(self, ids: np.ndarray):
        row_ptr = self.arrays["row_ptr"]
        lo = row_ptr[ids].astype(np.int64)
        row, e, rank = _ragged(lo, row_ptr[ids + 1] - lo)
        doc = self.arrays["docs"][e].astype(np.int64)
        start = self.corpus.offsets[doc].astype(np.int64)
        n_tokens = np.minimum(self.corpus.offsets[doc + 1] - start, self.seq_len + 1)  # data.overlong=truncate
        return (row, self.arrays["offsets"][e].astype(np.int64), start, n_tokens - 1, start + n_tokens,
                self.sample_id_base + doc, rank)


def _real_slots(rows) -> int:
    if isinstance(rows, LazyRows):
        return rows.real_slots
    return int((rows.sample_ids != PAD_DOC).sum())  # PackedRows: already in memory


class ConcatRows(LazyRows):
    """Rows of several row sources one after the other (one seq_len), stats summed; gathered lazily."""

    def __init__(self, parts: Sequence, name: str):
        if len({p.seq_len for p in parts}) != 1:
            raise ValueError(f"cannot join rows of different seq_len: {[p.seq_len for p in parts]}")
        self.parts, self.name, self.seq_len = list(parts), name, parts[0].seq_len
        self._base = np.cumsum([0] + [p.num_rows for p in self.parts])
        self.num_rows = int(self._base[-1])
        self.real_slots = sum(_real_slots(p) for p in self.parts)
        self.truncated, self.dropped = sum(p.truncated for p in parts), sum(p.dropped for p in parts)

    def gather(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = self._check_ids(row_ids)
        part = np.searchsorted(self._base, ids, side="right") - 1
        out = None
        for i in np.unique(part):
            sel = part == i
            rows = self.parts[i].gather(ids[sel] - self._base[i])
            if out is None:
                out = {f: np.empty((len(ids), self.seq_len), a.dtype) for f, a in rows.items()}
            for f, a in rows.items():
                out[f][sel] = a
        return out if out is not None else self.parts[0].gather(ids)
