"""Pretraining data: documents -> cached token ids -> one EOS-joined stream -> fixed rows -> batches.

Formats (``data.format`` / ``DataSource.format``): ``text`` (blank-line separated blocks), ``jsonl_text``,
``parquet`` and ``hf_disk`` (a ``datasets.save_to_disk`` directory) with the text in column ``text_field``,
and ``megatron`` (a tokenized ``.bin``/``.idx`` pair, see megatron_indexed.py). Every format yields a
:class:`TokenizedCorpus` of documents without EOS.

Text formats are tokenized once per (file contents, tokenizer, format, field) and cached as .npy files
(uint32 tokens, int64 document offsets) plus a small JSON of skipped bad rows, so a rerun or a resumed job
skips tokenization. Text and JSONL are read with plain Python, Parquet with pyarrow in row batches: exact
file:line (or file: row) errors, streaming without a second on-disk copy. Megatron files are already
tokenized: they are memory-mapped, never cached.

A malformed row (bad JSON, a missing or non-string text field) stops the run with an error naming file and
line, or with ``data.on_bad_row=skip`` is skipped and counted per file; the counts are logged as warnings and
returned by :func:`read_source`. Whitespace-only documents are always skipped quietly.

Rows are non-overlapping windows of seq_len + 1 tokens (input = row[:-1], labels = row[1:]); the tail that
does not fill a row is dropped. Each document is followed by EOS, so the model learns where documents end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL
from trainer.config import PRETRAIN_FORMATS, ConfigError, DataConfig, DataSource
from trainer.data.corpus import TokenizedCorpus
from trainer.data.megatron_indexed import prefix_paths, read_megatron
from trainer.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Bump when the cache layout or the tokenization rule changes, so stale caches are never read.
CACHE_VERSION = 2
_SUFFIXES = {"text": (".txt",), "jsonl_text": (".jsonl",), "parquet": (".parquet",)}
_TEXT_FIELD_FORMATS = ("jsonl_text", "parquet", "hf_disk")
_ENCODE_BATCH = 1024  # documents per tokenizer call: large enough for the Rust tokenizer's threads
_ROW_BATCH = 4096  # Parquet / Arrow rows materialised as Python strings at a time
_PROGRESS_AFTER = 4096  # documents; smaller corpora tokenize in about a second, quietly


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A set of files in one format; ``name`` is how error messages refer to it."""

    name: str
    files: tuple[Path, ...]
    format: str
    text_field: str


def _resolve_hf_disk(p: Path, path: str, setting: str) -> tuple[Path, ...]:
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
        raise ConfigError(f"{setting}={path!r} is a saved DatasetDict with splits {splits}; point it at one "
                          f"split's directory, e.g. {str(p / (splits[0] if splits else 'train'))!r}")
    if not (p / "state.json").is_file():
        raise ConfigError(f"{setting}={path!r} is not a datasets.save_to_disk directory (no state.json) "
                          f"for data.format='hf_disk'")
    return (p,)


def resolve_files(path: str, fmt: str, setting: str) -> tuple[Path, ...]:
    """A file, a directory (searched recursively for the format's suffix) or a glob pattern.

    hf_disk: the save_to_disk directory itself; megatron: the prefix's (.idx, .bin) pair.
    """
    p = Path(path).expanduser()
    if fmt == "megatron":
        files = prefix_paths(p)
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{setting}={path!r}: {f} does not exist; for data.format='megatron' give the "
                                  f"prefix of a .bin/.idx pair (without the suffix)")
        return files
    if fmt not in _SUFFIXES and fmt != "hf_disk":
        raise ConfigError(f"{setting}={path!r}: data.format={fmt!r} is not a pretraining format; expected one "
                          f"of {list(PRETRAIN_FORMATS)}")
    if fmt == "hf_disk" and p.is_dir():
        return _resolve_hf_disk(p, path, setting)
    if fmt == "hf_disk":
        raise ConfigError(f"{setting}={path!r} is not a directory; data.format='hf_disk' reads a directory "
                          f"written by datasets' save_to_disk")
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


# ------------------------------------------------------------------------------------- reading rows


class BadRows:
    """The data.on_bad_row policy: raise on the first malformed row, or skip it and count it per file."""

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row={policy!r} is not supported; expected one of ['error', 'skip']")
        self.policy = policy
        self.counts: dict[str, int] = {}

    def __call__(self, path: Path, where: str, problem: str) -> None:
        if self.policy == "error":
            raise ConfigError(f"{where}: {problem} (data.on_bad_row=skip would skip such rows)")
        self.counts[str(path)] = self.counts.get(str(path), 0) + 1


OnBad = Callable[[Path, str, str], None]


def _not_text(field: str, value: object) -> str:
    kind = "null" if value is None else type(value).__name__
    return f"field {field!r} is {kind}, expected a string"


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


def _read_jsonl(path: Path, field: str, bad: OnBad) -> Iterator[str]:
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(path, where, f"invalid JSON ({e.msg}, column {e.colno})")
                    continue
                if not isinstance(obj, dict) or field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    bad(path, where, f"no {field!r} field (data.text_field); found {keys}")
                elif not isinstance(obj[field], str):
                    bad(path, where, _not_text(field, obj[field]))
                else:
                    yield obj[field]
    except UnicodeDecodeError as e:  # the file's encoding is wrong, not one row: always an error
        raise ConfigError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from e


def _column_values(path: Path, values: Iterator[object], field: str, bad: OnBad) -> Iterator[str]:
    """Rows of one column; rows are numbered from 0, as pyarrow and datasets index them."""
    for row, value in enumerate(values):
        if isinstance(value, str):
            yield value
        else:
            bad(path, f"{path}: row {row}", _not_text(field, value))


def _read_parquet(path: Path, field: str, bad: OnBad) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no {field!r} column (data.text_field); found {names}")
    batches = pf.iter_batches(batch_size=_ROW_BATCH, columns=[field])
    yield from _column_values(path, (v for b in batches for v in b.column(0).to_pylist()), field, bad)


def _read_hf_disk(path: Path, field: str, bad: OnBad) -> Iterator[str]:
    import datasets  # slow to import; only runs that read this format pay for it

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{path}: datasets.load_from_disk failed ({e})") from e
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"{path} holds a {type(ds).__name__}; point the path at one split's directory")
    if field not in ds.column_names:
        raise ConfigError(f"{path}: no {field!r} column (data.text_field); found {ds.column_names}")
    batches = ds.select_columns([field]).iter(batch_size=_ROW_BATCH)
    yield from _column_values(path, (v for b in batches for v in b[field]), field, bad)


def iter_documents(source: Source, bad: Optional[OnBad] = None) -> Iterator[str]:
    """Documents in file order; empty (whitespace-only) documents are skipped: they would only add an EOS."""
    bad = bad or BadRows("error")
    for path in source.files:
        if source.format == "text":
            docs = _read_text(path)
        elif source.format == "jsonl_text":
            docs = _read_jsonl(path, source.text_field, bad)
        elif source.format == "parquet":
            docs = _read_parquet(path, source.text_field, bad)
        elif source.format == "hf_disk":
            docs = _read_hf_disk(path, source.text_field, bad)
        else:
            raise ConfigError(f"{source.name}: data.format={source.format!r} is not a text format to tokenize")
        for doc in docs:
            if doc.strip():
                yield doc


# ------------------------------------------------------------------------------------ token cache


def _content_files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs whose contents define a source entry: the file, or every file of a directory."""
    if path.is_dir():
        return [(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()]
    return [(path.name, path)]


def cache_key(source: Source, tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    field = source.text_field if source.format in _TEXT_FIELD_FORMATS else ""
    h.update(f"v{CACHE_VERSION}|{source.format}|{field}|{tokenizer_fingerprint(tokenizer)}".encode())
    for entry in source.files:  # contents and order matter, where the files live does not
        for name, path in _content_files(entry):
            h.update(f"|{name}|{path.stat().st_size}|".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:32]


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # No BOS/EOS from the tokenizer's post-processor: EOS placement is ours. verbose=False silences the
    # "longer than model_max_length" warning, which is about model inputs, not whole documents.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize(source: Source, tokenizer: PreTrainedTokenizerBase,
              bad: Optional[OnBad] = None) -> tuple[np.ndarray, np.ndarray]:
    chunks, lengths, batch, bar = [], [0], [], None

    def flush() -> None:
        for ids in _encode_batch(tokenizer, batch):
            chunks.append(np.asarray(ids, dtype=np.uint32))
            lengths.append(len(ids))
        batch.clear()

    for n, doc in enumerate(iter_documents(source, bad), 1):
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


def _write_atomic(path: Path, write: Callable) -> None:
    """Readers see the old file or the complete new one, never a partial write (concurrent ranks, crashes)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_atomic(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _load_cached(tokens_path: Path, offsets_path: Path,
                 meta_path: Path) -> Optional[tuple[np.ndarray, np.ndarray, dict[str, int]]]:
    if not (tokens_path.is_file() and offsets_path.is_file() and meta_path.is_file()):
        return None
    try:
        tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
        bad_rows = json.loads(meta_path.read_text(encoding="utf-8"))["bad_rows"]
    except (ValueError, OSError, KeyError, TypeError):
        return None  # unreadable: rebuild and overwrite
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens):
        return None
    if not isinstance(bad_rows, dict):
        return None
    return tokens, offsets, bad_rows


def read_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                on_bad_row: str = "error") -> tuple[TokenizedCorpus, dict[str, int]]:
    """Token ids of every document of a text-format ``source`` and the bad rows skipped per file.

    Read from the cache when the same files, format, field and tokenizer were seen. The cache key leaves the
    bad-row policy out: an entry made with ``skip`` that skipped rows is re-read under ``error``, which raises.
    """
    policy = BadRows(on_bad_row)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, tokenizer)
    tokens_path, offsets_path = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.offsets.npy"
    meta_path = cache_dir / f"{key}.meta.json"
    cached = _load_cached(tokens_path, offsets_path, meta_path)
    if cached is None or (cached[2] and policy.policy == "error"):
        tokens, offsets = _tokenize(source, tokenizer, policy)
        meta = json.dumps({"source": source.name, "bad_rows": policy.counts}, indent=1).encode()
        # Offsets last: their presence marks a complete entry (all files derive from the same key).
        _save_atomic(tokens_path, tokens)
        _write_atomic(meta_path, lambda f: f.write(meta))
        _save_atomic(offsets_path, offsets)
        cached = _load_cached(tokens_path, offsets_path, meta_path)
        assert cached is not None, f"token cache {tokens_path} unreadable right after writing it"
    tokens, offsets, bad_rows = cached
    return TokenizedCorpus(source.name, tokens, offsets), bad_rows


def log_bad_rows(bad_rows: dict[str, int]) -> None:
    for path, n in bad_rows.items():
        logger.warning("skipped %d bad row%s in %s (data.on_bad_row=skip)", n, "" if n == 1 else "s", path)


def tokenize_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                    on_bad_row: str = "error") -> TokenizedCorpus:
    """:func:`read_source`, logging a warning per file with skipped bad rows."""
    corpus, bad_rows = read_source(source, tokenizer, cache_dir, on_bad_row)
    log_bad_rows(bad_rows)
    return corpus


# ------------------------------------------------------------------------------------- source entry


def _is_bundled(path: str, which: Path) -> bool:
    return Path(path).expanduser().resolve() == Path(which).resolve()


def data_sources(data_cfg: DataConfig) -> list[DataSource]:
    """The training corpora: ``data.sources``, else the ``data.path``/``format``/``text_field`` shortcut,
    else the bundled corpus (JSONL whatever data.format says)."""
    if data_cfg.sources:
        return list(data_cfg.sources)
    if data_cfg.path is None:
        return [DataSource(path=str(BUNDLED_TRAIN), format="jsonl_text", text_field="text")]
    return [DataSource(path=data_cfg.path, format=data_cfg.format, text_field=data_cfg.text_field)]


def load_source_corpus(source: DataSource, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                       cache_dir: Path, setting: str = "data.path") -> TokenizedCorpus:
    """Documents of one pretraining source (without EOS: the packer appends it).

    Text formats go through the token cache; megatron files are memory-mapped and their ids checked against
    the tokenizer. ``setting`` is how errors name the path, e.g. "data.sources[1].path".
    """
    if _is_bundled(source.path, BUNDLED_TRAIN) or _is_bundled(source.path, BUNDLED_VAL):
        name = f"the bundled {Path(source.path).name}"
    else:
        name = f"{setting}={source.path!r}"
    if source.format == "megatron":
        resolve_files(source.path, "megatron", setting)  # a missing file is named with the setting
        return read_megatron(source.path, vocab_size=len(tokenizer), name=name)
    files = resolve_files(source.path, source.format, setting)
    return tokenize_source(Source(name, files, source.format, source.text_field), tokenizer, cache_dir,
                           data_cfg.on_bad_row)


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
    setting = "data.path"
    if split == "val" and data_cfg.val_path is not None:
        source = DataSource(path=data_cfg.val_path, format=data_cfg.format, text_field=data_cfg.text_field)
        setting = "data.val_path"
    elif split == "val" and data_cfg.path is None:
        source = DataSource(path=str(BUNDLED_VAL), format="jsonl_text", text_field="text")
    else:
        # Not data_sources(): this single-corpus path reads data.path (or the bundled corpus), never data.sources.
        source = (DataSource(path=str(BUNDLED_TRAIN), format="jsonl_text", text_field="text") if data_cfg.path is None
                  else DataSource(path=data_cfg.path, format=data_cfg.format, text_field=data_cfg.text_field))
    corpus = load_source_corpus(source, tokenizer, data_cfg, cache_dir, setting)

    holds_out = data_cfg.path is not None and data_cfg.val_path is None
    if not holds_out:
        return corpus, 0, corpus.num_docs
    if data_cfg.val_fraction == 0:
        if split == "val":
            raise ConfigError("there is no validation split: data.val_fraction=0 and data.val_path is unset; "
                              "set one of them, or trainer.eval_every=0")
        return corpus, 0, corpus.num_docs
    n_val = _held_out(corpus.num_docs, data_cfg, corpus.name)
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
