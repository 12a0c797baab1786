"""Tokenized documents -> fixed rows of seq_len slots, with document boundaries kept.

Each document (or conversation) of n tokens gives n - 1 slots: input = tokens[:-1], label = tokens[1:], so a
label never crosses into the next document. Every slot also carries its position within its piece of a
document (restarting at 0, as if the piece were alone), a document id that is distinct per piece within the
row (the attention mask lets a token see only its own piece; see trainer/model/attention.py), and the global
sample id of the document it came from (-1 for padding), so tests and logs can count consumed samples.

- Pretraining (``targets is None``): every document is followed by EOS and the slot stream is cut into rows
  that it fills exactly (concatenate-and-chunk, as GPT-2/Megatron do). A document longer than the room left
  in a row continues in the next row as a new piece, positions restarting; only the final incomplete row is
  dropped.
- SFT (``targets`` given): whole conversations are packed by best-fit decreasing (Krause et al., "Efficient
  sequence packing without cross-contamination", 2021): never split, so every assistant turn keeps its whole
  prompt in view. Conversations over seq_len + 1 tokens follow ``overlong``.
- ``packing=False``: one document per row, padded; pretraining documents longer than a row take several.

Everything here is a pure function of the corpus and settings (no seed): the shuffle belongs to the loader.
``pack_corpus`` builds every row in memory; training uses row_index.py's RowIndex instead (the same rows from
an O(documents) index, built per batch), and tests hold the two against each other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus

IGNORE_INDEX = -100  # label of a slot that carries no loss (padding, prompt tokens), as in HF and torch CE
PAD_DOC = -1  # document id and sample id of padding slots
OVERLONG = ("truncate", "drop", "error")
_BFD_PROGRESS_AFTER = 1 << 17  # conversations


@dataclass
class PackedRows:
    """Rows of ``seq_len`` slots; every field is a numpy array [num_rows, seq_len]."""

    name: str
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where there is no loss
    position_ids: np.ndarray  # int32, restart at 0 per document piece
    document_ids: np.ndarray  # int32, distinct per piece within a row, PAD_DOC for padding
    sample_ids: np.ndarray  # int64, global id of the source document, PAD_DOC for padding
    truncated: int = 0  # overlong samples cut to seq_len + 1 tokens
    dropped: int = 0  # overlong samples left out

    FIELDS = ("input_ids", "labels", "position_ids", "document_ids", "sample_ids")

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def efficiency(self) -> float:
        """Real (non-padding) slots over all slots."""
        total = self.sample_ids.size
        return float((self.sample_ids != PAD_DOC).sum()) / total if total else 0.0

    def stats(self) -> dict[str, float]:
        return {"rows": self.num_rows, "efficiency": self.efficiency, "truncated": self.truncated,
                "dropped": self.dropped}

    def gather(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``row_ids`` of every field (the interface RowIndex, the lazy equivalent, also has)."""
        ids = np.asarray(row_ids, dtype=np.int64)
        return {f: getattr(self, f)[ids] for f in self.FIELDS}


# ------------------------------------------------------------------------------------------ placing


def _fill(corpus_tokens: np.ndarray, doc_end: np.ndarray, eos_id: Optional[int], targets: Optional[np.ndarray],
          num_rows: int, seq_len: int, src: np.ndarray, length: np.ndarray, row: np.ndarray, offset: np.ndarray,
          end: np.ndarray, sample: np.ndarray, name: str) -> PackedRows:
    """Write pieces into rows. Piece p is ``length[p]`` slots whose inputs are corpus tokens starting at
    ``src[p]``, placed at (row[p], offset[p]); its document ends at token ``end[p]`` (exclusive), past which
    the label is EOS (pretraining). Pieces of a row must be given in offset order."""
    shape = (num_rows, seq_len)
    out_inputs = np.zeros(shape, np.int32)
    out_labels = np.full(shape, IGNORE_INDEX, np.int32)
    out_pos = np.zeros(shape, np.int32)
    out_doc = np.full(shape, PAD_DOC, np.int32)
    out_sample = np.full(shape, PAD_DOC, np.int64)
    if len(length):
        # Piece rank within its row: pieces arrive grouped by row in offset order.
        order = np.lexsort((offset, row))
        src, length, row, offset, end, sample = (a[order] for a in (src, length, row, offset, end, sample))
        first = np.r_[True, row[1:] != row[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(row)), 0))
        rank = np.arange(len(row)) - group_start

        piece = np.repeat(np.arange(len(length)), length)
        j = np.arange(piece.size) - np.repeat(np.cumsum(length) - length, length)
        tok = src[piece] + j
        dst = (row[piece] * seq_len + offset[piece] + j).astype(np.int64)
        nxt = tok + 1
        inside = nxt < end[piece]
        labels = corpus_tokens[np.minimum(nxt, len(corpus_tokens) - 1)].astype(np.int64)
        if targets is not None:
            labels = np.where(targets[np.minimum(nxt, len(targets) - 1)], labels, IGNORE_INDEX)
        labels = np.where(inside, labels, IGNORE_INDEX if eos_id is None else eos_id)
        out_inputs.reshape(-1)[dst] = corpus_tokens[tok]
        out_labels.reshape(-1)[dst] = labels
        out_pos.reshape(-1)[dst] = j
        out_doc.reshape(-1)[dst] = rank[piece]
        out_sample.reshape(-1)[dst] = sample[piece]
    return PackedRows(name, out_inputs, out_labels, out_pos, out_doc, out_sample)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(bin, offset) of every item and the number of bins: largest item first, each into the fullest bin
    that still has room (ties: the earliest bin). O(n log capacity) with one list of bins per free amount."""
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    bins = np.zeros(len(sizes), np.int64)
    offsets = np.zeros(len(sizes), np.int64)
    free_keys: list[int] = []  # sorted distinct free amounts that some bin has
    by_free: dict[int, list[int]] = {}  # free amount -> bins with it, earliest first
    used: list[int] = []
    # A Python loop (~1 s per million items): show progress when it is long enough to notice.
    bar = tqdm(total=len(sizes), desc="packing conversations (best-fit decreasing)", unit=" conv",
               disable=len(sizes) < _BFD_PROGRESS_AFTER)
    for n, i in enumerate(order.tolist(), 1):
        if n % _BFD_PROGRESS_AFTER == 0:
            bar.update(_BFD_PROGRESS_AFTER)
        size = int(sizes[i])
        k = bisect.bisect_left(free_keys, size)
        if k < len(free_keys):
            free = free_keys[k]
            b = by_free[free].pop(0)
            if not by_free[free]:
                del by_free[free]
                free_keys.pop(k)
        else:
            b, free = len(used), capacity
            used.append(0)
        bins[i], offsets[i] = b, used[b]
        used[b] += size
        left = free - size
        if left > 0:
            if left not in by_free:
                bisect.insort(free_keys, left)
                by_free[left] = []
            bisect.insort(by_free[left], b)
    bar.update(len(sizes) - bar.n)
    bar.close()
    return bins, offsets, len(used)


# ------------------------------------------------------------------------------------------- corpora


def _pack_pretrain(corpus: TokenizedCorpus, lo_doc: int, hi_doc: int, seq_len: int, eos_id: int, packing: bool,
                   sample_id_base: int) -> PackedRows:
    starts = corpus.offsets[lo_doc:hi_doc].astype(np.int64)
    ends = corpus.offsets[lo_doc + 1:hi_doc + 1].astype(np.int64)
    n_slots = ends - starts  # the document's tokens; with EOS appended that is len - 1 slots
    doc_index = np.arange(lo_doc, hi_doc, dtype=np.int64)
    if packing:
        lo, total = int(starts[0]) if len(starts) else 0, int(n_slots.sum())
        num_rows = total // seq_len
        if num_rows == 0:
            return _fill(corpus.tokens, ends, eos_id, None, 0, seq_len, *(np.zeros(0, np.int64),) * 6, corpus.name)
        # Stream position p is corpus token lo + p; pieces start at document starts and row starts.
        cum_end = np.cumsum(n_slots)
        cuts = np.union1d(cum_end - n_slots, np.arange(0, num_rows * seq_len, seq_len))
        cuts = cuts[cuts < num_rows * seq_len]
        length = np.diff(np.r_[cuts, num_rows * seq_len])
        doc = np.searchsorted(cum_end, cuts, side="right")  # skips empty documents
        return _fill(corpus.tokens, ends, eos_id, None, num_rows, seq_len, lo + cuts, length, cuts // seq_len,
                     cuts % seq_len, ends[doc], sample_id_base + doc_index[doc], corpus.name)
    # One document per row; a long one takes ceil(n / seq_len) rows.
    chunks = -(-n_slots // seq_len)
    doc = np.repeat(np.arange(len(n_slots)), chunks)
    k = np.arange(doc.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    src = starts[doc] + k * seq_len
    length = np.minimum(seq_len, n_slots[doc] - k * seq_len)
    zeros = np.zeros(doc.size, np.int64)
    return _fill(corpus.tokens, ends, eos_id, None, doc.size, seq_len, src, length, np.arange(doc.size), zeros,
                 ends[doc], sample_id_base + doc_index[doc], corpus.name)


def select_conversations(n_tokens: np.ndarray, first_doc: int, seq_len: int, overlong: str,
                         name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(kept mask, token counts after truncation, truncated, dropped) of conversations with ``n_tokens``
    tokens (the first is corpus document ``first_doc``) under ``data.overlong``."""
    too_long = n_tokens > seq_len + 1
    if overlong == "error" and too_long.any():
        i = int(np.argmax(too_long))
        raise ConfigError(f"{name}: sample {first_doc + i} has {int(n_tokens[i])} tokens, more than "
                          f"data.seq_len+1={seq_len + 1} ({int(too_long.sum())} such samples); set "
                          f"data.overlong=truncate or drop, or raise data.seq_len")
    keep = n_tokens >= 2  # a single token predicts nothing
    if overlong == "drop":
        keep &= ~too_long
    truncated = int(too_long.sum()) if overlong == "truncate" else 0
    dropped = int(too_long.sum()) if overlong == "drop" else 0
    # truncate keeps the first seq_len + 1 tokens
    return keep, np.minimum(n_tokens, seq_len + 1), truncated, dropped


def _pack_sft(corpus: TokenizedCorpus, lo_doc: int, hi_doc: int, seq_len: int, packing: bool, overlong: str,
              sample_id_base: int) -> PackedRows:
    starts = corpus.offsets[lo_doc:hi_doc].astype(np.int64)
    n_tokens = corpus.offsets[lo_doc + 1:hi_doc + 1].astype(np.int64) - starts
    doc_index = np.arange(lo_doc, hi_doc, dtype=np.int64)
    keep, n_tokens, truncated, dropped = select_conversations(n_tokens, lo_doc, seq_len, overlong, corpus.name)
    starts, n_tokens, doc_index = starts[keep], n_tokens[keep], doc_index[keep]
    size = n_tokens - 1
    if packing:
        row, offset, num_rows = best_fit_decreasing(size, seq_len)
    else:
        row, offset, num_rows = np.arange(len(size)), np.zeros(len(size), np.int64), len(size)
    packed = _fill(corpus.tokens, starts + n_tokens, None, corpus.targets, num_rows, seq_len, starts, size, row,
                   offset, starts + n_tokens, sample_id_base + doc_index, corpus.name)
    packed.truncated, packed.dropped = truncated, dropped
    return packed


def check_pack_args(corpus: TokenizedCorpus, seq_len: int, eos_id: Optional[int], overlong: str, start: int,
                    stop: Optional[int]) -> int:
    """Validate the packing arguments (pack_corpus' and RowIndex's); returns the span's end."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG}")
    if corpus.targets is None and eos_id is None:
        raise ValueError(f"{corpus.name} is a pretraining corpus (no targets): eos_id is required")
    stop = corpus.num_docs if stop is None else stop
    if not 0 <= start <= stop <= corpus.num_docs:
        raise ValueError(f"document span [{start}, {stop}) is outside {corpus.name}'s {corpus.num_docs} documents")
    if corpus.pairs and (start % 2 or stop % 2):
        raise ValueError(f"document span [{start}, {stop}) of {corpus.name} splits a preference pair (2i, 2i + 1)")
    return stop


def pack_corpus(corpus: TokenizedCorpus, seq_len: int, eos_id: Optional[int], packing: bool = True, overlong: str = "truncate",
                sample_id_base: int = 0, start: int = 0, stop: Optional[int] = None) -> PackedRows:
    """Rows of documents [start, stop) of a TokenizedCorpus (see the module docstring for the rules).

    ``eos_id`` is appended to every pretraining document and must be given for them; SFT conversations
    (``corpus.targets`` set) end the way their chat template ends them and ignore it. ``overlong`` applies
    to SFT only: pretraining documents are chunked, never cut. Sample ids are ``sample_id_base`` + the
    document's index in the corpus, so several corpora of a blend can keep their ids apart.
    """
    stop = check_pack_args(corpus, seq_len, eos_id, overlong, start, stop)
    if corpus.pairs:  # the pair plan has one implementation, row_index's; here its rows, materialized
        from trainer.data.row_index import build_rows

        return build_rows(corpus, seq_len, None, packing, overlong, sample_id_base, start, stop).materialize()
    if corpus.targets is None:
        if corpus.eod:
            corpus = without_final_tokens(corpus)
        return _pack_pretrain(corpus, start, stop, seq_len, eos_id, packing, sample_id_base)
    return _pack_sft(corpus, start, stop, seq_len, packing, overlong, sample_id_base)


def without_final_tokens(corpus: TokenizedCorpus) -> TokenizedCorpus:
    """The corpus with each non-empty document's last token (its EOS, corpus.eod) removed, in memory: packing
    appends that EOS again, so the rows are the ones Megatron-LM trains on, with no second EOS."""
    n = np.diff(corpus.offsets)
    keep = np.ones(len(corpus.tokens), bool)
    keep[(corpus.offsets[1:] - 1)[n > 0]] = False
    offsets = np.concatenate([[0], np.cumsum(np.maximum(n - 1, 0))]).astype(np.int64)
    return TokenizedCorpus(corpus.name, np.asarray(corpus.tokens)[keep], offsets)


def concat_rows(parts: list[PackedRows], name: str) -> PackedRows:
    """Rows of several PackedRows one after the other (same seq_len), stats summed."""
    if len({p.seq_len for p in parts}) > 1:
        raise ValueError(f"cannot join rows of different seq_len: {[p.seq_len for p in parts]}")
    fields = {f: np.concatenate([getattr(p, f) for p in parts]) for f in PackedRows.FIELDS}
    return PackedRows(name, **fields, truncated=sum(p.truncated for p in parts),
                      dropped=sum(p.dropped for p in parts))
