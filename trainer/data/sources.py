"""Pretraining source files -> documents (text strings), one reader per format.

Formats (``data.format`` / ``DataSource.format``): ``text`` (blank-line separated blocks), ``jsonl_text``,
``parquet`` and ``hf_disk`` (a ``datasets.save_to_disk`` directory) with the text in column ``text_field``.
Text and JSONL are read with plain Python, Parquet with pyarrow in row batches: exact file:line (or file: row)
errors, streaming without a second on-disk copy. ``megatron`` files are already tokenized
(megatron_indexed.py); only their paths are resolved here.

A malformed row (bad JSON, a missing or non-string text field) stops the run with an error naming file and
line, or with ``data.on_bad_row=skip`` is skipped and counted per file (:class:`BadRows`). Whitespace-only
documents are always skipped quietly.

A :class:`Part` is a piece of one file read on its own (by one of several processes tokenizing together):
the whole file, a line-aligned byte range of a text/JSONL file, or a range of a Parquet file's row groups.
Reading the parts of a file in order gives exactly the documents, bad rows and file:line errors of reading
the whole file: lines are split as Python's universal newlines split them, and a part's first line number
is counted (lazily, only when an error needs it) from the bytes before it.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from trainer.config import PRETRAIN_FORMATS
from trainer.errors import ConfigError
from trainer.data.megatron_indexed import prefix_paths

_SUFFIXES = {"text": (".txt",), "jsonl_text": (".jsonl",), "parquet": (".parquet",)}
_ROW_BATCH = 4096  # Parquet / Arrow rows materialised as Python strings at a time
_PROGRESS_BYTES = 1 << 20  # report progress about every MiB read
Progress = Optional[Callable[[int], None]]  # called with the bytes (or byte-equivalents) just consumed


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A set of files in one format; ``name`` is how error messages refer to it."""

    name: str
    files: tuple[Path, ...]
    format: str
    text_field: str


@dataclass(frozen=True)
class Part:
    """One file, or [start, stop) of it: bytes (text, JSONL, chat; start at a line start) or row groups
    (Parquet). ``stop=None``: to the end."""

    path: Path
    start: int = 0
    stop: Optional[int] = None


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


class _LineNo:
    """File line numbers of a part's lines, counted from the part's first byte only when asked (an error)."""

    def __init__(self, path: Path, start: int):
        self.path, self.start, self._base = path, start, None if start else 0

    def __call__(self, local: int) -> int:
        if self._base is None:
            self._base = _count_lines(self.path, self.start)
        return self._base + local

    def where(self, local: int) -> str:
        return f"{self.path}:{self(local)}"


def _count_lines(path: Path, stop: int) -> int:
    """Universal-newline lines in the first ``stop`` bytes (\n, \r\n and a lone \r each end one)."""
    n, last, left = 0, b"", stop
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            left -= len(chunk)
            n += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
            n -= last == b"\r" and chunk[:1] == b"\n"
            last = chunk[-1:]
    return n


def read_lines(part: Part, progress: Progress = None) -> Iterator[tuple[int, str, _LineNo]]:
    """(line number within the part from 1, line with its newline, line numbering) for every line that starts
    in the part, as ``open(path, encoding="utf-8")`` would yield them; bad UTF-8 is an error at its line."""
    numbering = _LineNo(part.path, part.start)
    local, pending = 0, 0
    with open(part.path, "rb") as f:
        f.seek(part.start)
        left = None if part.stop is None else part.stop - part.start
        for raw in f:
            if left is not None:
                if left <= 0:
                    break
                left -= len(raw)
            pending += len(raw)
            if progress is not None and pending >= _PROGRESS_BYTES:
                progress(pending)
                pending = 0
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{numbering.where(local + 1)}: not valid UTF-8 ({e.reason})") from e
            if "\r" not in line:
                local += 1
                yield local, line, numbering
                continue
            # Universal newlines: \r\n and a lone \r end lines too (text mode's translation).
            for sub in line.replace("\r\n", "\n").replace("\r", "\n").splitlines(keepends=True):
                local += 1
                yield local, sub, numbering
    if progress is not None and pending:
        progress(pending)


def _read_text(part: Part, progress: Progress = None) -> Iterator[str]:
    """Blank-line separated blocks; lines inside a block keep their indentation and newlines. A part starts
    and ends at block boundaries (shared.py splits text files only after a blank line)."""
    block: list[str] = []
    for _, line, _ in read_lines(part, progress):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def jsonl_rows(path: Union[Path, Part], progress: Progress = None) -> Iterator[tuple[str, object, Optional[str]]]:
    """(where, parsed object, problem) for every non-blank line of a JSONL file (or part); `where` is
    "file:line", and `problem` says why the line is not JSON (the object is then None). Bad UTF-8 is the
    file's fault, not a row's: always an error."""
    part = path if isinstance(path, Part) else Part(Path(path))
    for local, line, numbering in read_lines(part, progress):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield numbering.where(local), None, f"invalid JSON ({e.msg}, column {e.colno})"
            continue
        yield _Where(numbering, local), obj, None


class _Where:
    """A row's "file:line", formatted only if an error message needs it (most rows never do)."""

    __slots__ = ("numbering", "local")

    def __init__(self, numbering: _LineNo, local: int):
        self.numbering, self.local = numbering, local

    def __str__(self) -> str:
        return self.numbering.where(self.local)  # f"{where}" calls this too (object.__format__)


def _read_jsonl(part: Part, field: str, bad: OnBad, progress: Progress = None) -> Iterator[str]:
    path = part.path
    for where, obj, problem in jsonl_rows(part, progress):
        if problem is not None:
            bad(path, where, problem)
        elif not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            bad(path, where, f"no {field!r} field (data.text_field); found {keys}")
        elif not isinstance(obj[field], str):
            bad(path, where, _not_text(field, obj[field]))
        else:
            yield obj[field]


def _column_values(path: Path, values: Iterator[object], field: str, bad: OnBad, first_row: int = 0,
                   progress: Progress = None, bytes_per_row: float = 0.0) -> Iterator[str]:
    """Rows of one column; rows are numbered from 0, as pyarrow and datasets index them."""
    for row, value in enumerate(values, first_row):
        if progress is not None and (row - first_row) % _ROW_BATCH == _ROW_BATCH - 1:
            progress(int(bytes_per_row * _ROW_BATCH))
        if isinstance(value, str):
            yield value
        else:
            bad(path, f"{path}: row {row}", _not_text(field, value))


def require_package(name: str, what: str) -> None:
    """A format's reader package (installed with meshtron's dependencies) may be missing on a minimal
    install: refuse in one line naming it, before any row is read."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"{what} is read with the {name} package, which is not installed; pip install {name}")


def open_parquet(path: Path, field: str):
    """The ParquetFile, checked to hold the text column."""
    require_package("pyarrow", "data.format=parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no {field!r} column (data.text_field); found {names}")
    return pf


def _read_parquet(part: Part, field: str, bad: OnBad, progress: Progress = None) -> Iterator[str]:
    path = part.path
    pf = open_parquet(path, field)
    meta = pf.metadata
    groups = list(range(part.start, meta.num_row_groups if part.stop is None else part.stop))
    first_row = sum(meta.row_group(g).num_rows for g in range(part.start))
    rows = sum(meta.row_group(g).num_rows for g in groups)
    per_row = path.stat().st_size / max(1, meta.num_rows)
    batches = pf.iter_batches(batch_size=_ROW_BATCH, columns=[field], row_groups=groups) if rows else iter(())
    yield from _column_values(path, (v for b in batches for v in b.column(0).to_pylist()), field, bad,
                              first_row, progress, per_row)


def load_hf_disk(path: Path, what: str):
    """The datasets.Dataset a save_to_disk directory holds (one split), or one line saying why not."""
    require_package("datasets", what)
    import datasets  # slow to import; only runs that read this format pay for it

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{path}: datasets.load_from_disk failed ({e})") from e
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"{path} holds a {type(ds).__name__}; point the path at one split's directory")
    return ds


def _read_hf_disk(part: Part, field: str, bad: OnBad, progress: Progress = None) -> Iterator[str]:
    path = part.path
    ds = load_hf_disk(path, "data.format=hf_disk")
    if field not in ds.column_names:
        raise ConfigError(f"{path}: no {field!r} column (data.text_field); found {ds.column_names}")
    per_row = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / max(1, len(ds))
    batches = ds.select_columns([field]).iter(batch_size=_ROW_BATCH)
    yield from _column_values(path, (v for b in batches for v in b[field]), field, bad, 0, progress, per_row)


_READERS = {"jsonl_text": _read_jsonl, "parquet": _read_parquet, "hf_disk": _read_hf_disk}


def part_documents(part: Part, fmt: str, field: str, bad: OnBad, progress: Progress = None) -> Iterator[str]:
    """Documents of one part; empty (whitespace-only) documents are skipped: they would only add an EOS."""
    if fmt == "text":
        docs = _read_text(part, progress)
    elif fmt in _READERS:
        docs = _READERS[fmt](part, field, bad, progress)
    else:
        raise ConfigError(f"{part.path}: data.format={fmt!r} is not a text format to tokenize")
    for doc in docs:
        if doc.strip():
            yield doc


def iter_documents(source: Source, bad: Optional[OnBad] = None) -> Iterator[str]:
    """Documents in file order (see :func:`part_documents`)."""
    bad = bad or BadRows("error")
    if source.format not in _READERS and source.format != "text":
        raise ConfigError(f"{source.name}: data.format={source.format!r} is not a text format to tokenize")
    for path in source.files:
        yield from part_documents(Part(path), source.format, source.text_field, bad)
