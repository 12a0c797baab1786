"""Pretraining data: documents -> cached token ids -> one EOS-joined stream -> fixed rows -> batches.

Documents are tokenized once per (file contents, tokenizer, format) and cached as two .npy files (uint32
tokens and int64 document offsets), so a rerun or a resumed job skips tokenization. The cache keeps
document boundaries, which packing with document masks and data blends will need later; rows are built from
it in memory. Files are read with plain Python rather than HF ``datasets``: it gives exact file:line errors,
streams without a second on-disk copy of the corpus, and touches no cache outside ours.

Rows are non-overlapping windows of seq_len + 1 tokens (input = row[:-1], labels = row[1:]); the tail that
does not fill a row is dropped. Each document is followed by EOS, so the model learns where documents end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL
from trainer.config import ConfigError, DataConfig
from trainer.data.corpus import TokenizedCorpus
from trainer.data.tokenizer import tokenizer_fingerprint

# Bump when the cache layout or the tokenization rule changes, so stale caches are never read.
CACHE_VERSION = 1
_SUFFIXES = {"text": (".txt",), "jsonl_text": (".jsonl",)}
_ENCODE_BATCH = 1024  # documents per tokenizer call: large enough for the Rust tokenizer's threads
_PROGRESS_AFTER = 4096  # documents; smaller corpora tokenize in about a second, quietly


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A set of files in one format; ``name`` is how error messages refer to it."""

    name: str
    files: tuple[Path, ...]
    format: str
    text_field: str


def resolve_files(path: str, fmt: str, setting: str) -> tuple[Path, ...]:
    """A file, a directory (searched recursively for the format's suffix) or a glob pattern."""
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES[fmt]
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.is_file():
        files = [p]
    else:
        raise ConfigError(f"{setting}={path!r} does not exist; expected a file, a directory or a glob pattern")
    if not files:
        raise ConfigError(f"{setting}={path!r} holds no {'/'.join(_SUFFIXES[fmt])} files for data.format={fmt!r}")
    return tuple(files)


def _read_text(path: Path) -> Iterator[str]:
    """Blank-line separated blocks; lines inside a block keep their indentation and newlines."""
    block: list[str] = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from e
    if block:
        yield "".join(block).rstrip("\n")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(obj, dict) or field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ConfigError(f"{path}:{lineno}: no {field!r} field (data.text_field); found {keys}")
                if not isinstance(obj[field], str):
                    raise ConfigError(f"{path}:{lineno}: field {field!r} is {type(obj[field]).__name__}, "
                                      f"expected a string")
                yield obj[field]
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from e


def iter_documents(source: Source) -> Iterator[str]:
    """Documents in file order; empty (whitespace-only) documents are skipped: they would only add an EOS."""
    for path in source.files:
        docs = _read_text(path) if source.format == "text" else _read_jsonl(path, source.text_field)
        for doc in docs:
            if doc.strip():
                yield doc


# ------------------------------------------------------------------------------------ token cache


def cache_key(source: Source, tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    field = source.text_field if source.format == "jsonl_text" else ""
    h.update(f"v{CACHE_VERSION}|{source.format}|{field}|{tokenizer_fingerprint(tokenizer)}".encode())
    for path in source.files:  # contents and order matter, where the files live does not
        h.update(f"|{path.name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # No BOS/EOS from the tokenizer's post-processor: EOS placement is ours. verbose=False silences the
    # "longer than model_max_length" warning, which is about model inputs, not whole documents.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize(source: Source, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    chunks, lengths, batch, bar = [], [0], [], None

    def flush() -> None:
        for ids in _encode_batch(tokenizer, batch):
            chunks.append(np.asarray(ids, dtype=np.uint32))
            lengths.append(len(ids))
        batch.clear()

    for n, doc in enumerate(iter_documents(source), 1):
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            flush()
        if bar is None and n > _PROGRESS_AFTER:
            bar = tqdm(desc=f"tokenizing {source.name}", unit=" docs", initial=n - 1)
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
    return tokens, np.cumsum(np.asarray(lengths, dtype=np.int64))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Readers see the old file or the complete new one, never a partial write (concurrent ranks, crashes)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(tokens_path: Path, offsets_path: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    if not (tokens_path.is_file() and offsets_path.is_file()):
        return None
    try:
        tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
    except (ValueError, OSError):
        return None  # unreadable: rebuild and overwrite
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens):
        return None
    return tokens, offsets


def tokenize_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path) -> TokenizedCorpus:
    """Token ids of every document of ``source``, from the cache when the same files and tokenizer were seen."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, tokenizer)
    tokens_path, offsets_path = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.offsets.npy"
    cached = _load_cached(tokens_path, offsets_path)
    if cached is None:
        tokens, offsets = _tokenize(source, tokenizer)
        # Offsets last: their presence marks a complete entry (both files derive from the same key).
        _save_atomic(tokens_path, tokens)
        _save_atomic(offsets_path, offsets)
        cached = _load_cached(tokens_path, offsets_path)
        assert cached is not None, f"token cache {tokens_path} unreadable right after writing it"
    return TokenizedCorpus(source.name, *cached)


# -------------------------------------------------------------------------------------------- splits


def has_val_split(data_cfg: DataConfig) -> bool:
    return data_cfg.val_path is not None or data_cfg.path is None or data_cfg.val_fraction > 0


def _held_out(num_docs: int, data_cfg: DataConfig, name: str) -> int:
    """How many trailing documents of the training files are held out for validation."""
    n_val = max(1, round(num_docs * data_cfg.val_fraction))
    if num_docs - n_val < 1:
        raise ConfigError(f"{name} has {num_docs} document(s): holding out data.val_fraction="
                          f"{data_cfg.val_fraction} leaves none for training; set data.val_path instead")
    return n_val


def split_documents(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str,
                    cache_dir: Path) -> tuple[TokenizedCorpus, int, int]:
    """The tokenized corpus a split reads and its document range [start, stop)."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; expected 'train' or 'val'")
    bundled = Source("the bundled train.jsonl", (BUNDLED_TRAIN,), "jsonl_text", "text")
    if split == "val" and data_cfg.val_path is not None:
        files = resolve_files(data_cfg.val_path, data_cfg.format, "data.val_path")
        source = Source(f"data.val_path={data_cfg.val_path!r}", files, data_cfg.format, data_cfg.text_field)
    elif split == "val" and data_cfg.path is None:
        source = Source("the bundled val.jsonl", (BUNDLED_VAL,), "jsonl_text", "text")
    elif data_cfg.path is None:  # the bundled corpus is JSONL whatever data.format says
        source = bundled
    else:
        files = resolve_files(data_cfg.path, data_cfg.format, "data.path")
        source = Source(f"data.path={data_cfg.path!r}", files, data_cfg.format, data_cfg.text_field)
    corpus = tokenize_source(source, tokenizer, cache_dir)

    holds_out = data_cfg.path is not None and data_cfg.val_path is None
    if not holds_out:
        return corpus, 0, corpus.num_docs
    if data_cfg.val_fraction == 0:
        if split == "val":
            raise ConfigError("there is no validation split: data.val_fraction=0 and data.val_path is unset; "
                              "set one of them, or trainer.eval_every=0")
        return corpus, 0, corpus.num_docs
    n_val = _held_out(corpus.num_docs, data_cfg, source.name)
    cut = corpus.num_docs - n_val
    return (corpus, cut, corpus.num_docs) if split == "val" else (corpus, 0, cut)


# ---------------------------------------------------------------------------------------------- rows


def join_with_eos(corpus: TokenizedCorpus, start: int, stop: int, eos_id: int) -> np.ndarray:
    """Documents [start, stop) as one int64 stream, each followed by ``eos_id``."""
    lo, hi = int(corpus.offsets[start]), int(corpus.offsets[stop])
    n_docs = stop - start
    out = np.empty(hi - lo + n_docs, dtype=np.int64)
    # Document i's EOS lands after its own tokens plus the i EOS tokens inserted before it.
    eos_pos = corpus.offsets[start + 1:stop + 1] - lo + np.arange(n_docs)
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[eos_pos] = True
    out[is_eos] = eos_id
    out[~is_eos] = corpus.tokens[lo:hi]
    return out


def build_token_rows(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str,
                     cache_dir: Path) -> torch.Tensor:
    """LongTensor [num_rows, seq_len + 1] of the split's EOS-joined documents (see the module docstring)."""
    corpus, start, stop = split_documents(data_cfg, tokenizer, split, cache_dir)
    stream = join_with_eos(corpus, start, stop, tokenizer.eos_token_id)
    width = data_cfg.seq_len + 1
    num_rows = len(stream) // width
    if num_rows == 0:
        raise ConfigError(f"the {split} split of {corpus.name} has {len(stream)} tokens ({stop - start} "
                          f"documents, EOS included), fewer than one row of data.seq_len+1={width} tokens")
    return torch.from_numpy(stream[: num_rows * width].reshape(num_rows, width))


def _batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash rather than seed + epoch, so runs with neighbouring seeds do not share epoch orders.
    digest = hashlib.sha256(f"meshtron-rows|{seed}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowLoader:
    """Endless training batches: {"input_ids", "labels"}, LongTensor [batch_size, seq_len].

    Each epoch visits the rows in an order drawn from a generator seeded by (seed, epoch), never from global
    RNG state, so the order is a pure function of (seed, epoch, position) and resuming from ``state_dict()``
    continues exactly. An epoch is the largest multiple of batch_size rows; the few left over differ by epoch.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True,
                 name: str = "the training corpus"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(rows) < batch_size:
            raise ConfigError(
                f"{name} gives {len(rows)} rows of data.seq_len+1={rows.shape[1]} tokens "
                f"({rows.numel()} tokens), fewer than one batch of {batch_size} rows; use a larger corpus "
                f"or a smaller data.seq_len or batch size")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0  # position: rows of the current epoch already served
        self._order: Optional[torch.Tensor] = None

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.rows))
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(len(self.rows), generator=gen)

    def __iter__(self) -> "RowLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.batch_size > self.rows_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order()
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return _batch(self.rows[idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != len(self.rows):
            raise ConfigError(f"the saved data loader state is for {state['num_rows']} rows but this run's "
                              f"corpus gives {len(self.rows)}; the data or data.seq_len changed since the checkpoint")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def iter_batches(rows: torch.Tensor, batch_size: int,
                 max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Rows in order, for validation: every run sees the same batches; the last one may be smaller."""
    n = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    for i in range(0, n, batch_size):
        yield _batch(rows[i:min(i + batch_size, n)])


def default_cache_dir(data_cfg: DataConfig) -> Path:
    """data.cache_dir, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/meshtron, shared by all runs."""
    if data_cfg.cache_dir is not None:
        return Path(data_cfg.cache_dir).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshtron" / "tokens"
