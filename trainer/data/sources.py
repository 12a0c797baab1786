"""Pretraining source files -> documents (text strings), one reader per format.

Formats (``data.format`` / ``DataSource.format``): ``text`` (blank-line separated blocks), ``jsonl_text``,
``parquet`` and ``hf_disk`` (a ``datasets.save_to_disk`` directory) with the text in column ``text_field``.
Text and JSONL are read with plain Python, Parquet with pyarrow in row batches: exact file:line (or file: row)
errors, streaming without a second on-disk copy. ``megatron`` files are already tokenized
(megatron_indexed.py); only their paths are resolved here.

A malformed row (bad JSON, a missing or non-string text field) stops the run with an error naming file and
line, or with ``data.on_bad_row=skip`` is skipped and counted per file (:class:`BadRows`). Whitespace-only
documents are always skipped quietly.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from trainer.config import PRETRAIN_FORMATS, ConfigError
from trainer.data.megatron_indexed import prefix_paths

_SUFFIXES = {"text": (".txt",), "jsonl_text": (".jsonl",), "parquet": (".parquet",)}
_ROW_BATCH = 4096  # Parquet / Arrow rows materialised as Python strings at a time


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


def jsonl_rows(path: Path) -> Iterator[tuple[str, object, Optional[str]]]:
    """(where, parsed object, problem) for every non-blank line of a JSONL file; `where` is "file:line", and
    `problem` says why the line is not JSON (the object is then None). Bad UTF-8 is the file's fault, not a
    row's: always an error."""
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line), None
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", None, f"invalid JSON ({e.msg}, column {e.colno})"
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason})") from e


def _read_jsonl(path: Path, field: str, bad: OnBad) -> Iterator[str]:
    for where, obj, problem in jsonl_rows(path):
        if problem is not None:
            bad(path, where, problem)
        elif not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            bad(path, where, f"no {field!r} field (data.text_field); found {keys}")
        elif not isinstance(obj[field], str):
            bad(path, where, _not_text(field, obj[field]))
        else:
            yield obj[field]


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
