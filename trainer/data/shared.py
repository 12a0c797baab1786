"""Tokenizing one source with several processes: split its files into parts, write a part each, merge in order.

Used by training (every rank of the job tokenizes its share of a source whose token cache is missing) and by
``python -m trainer.data.preprocess`` (a pool of workers). A *part* (sources.Part) is a whole file, a
line-aligned byte range of a large text/JSONL file, or a range of a Parquet file's row groups; parts are
planned from file sizes alone, so every rank plans the same parts without talking to the others.

Protocol on the (shared) file system, under ``<entry>.parts/<plan>/``:

* ``part-NNNNN.bin/.idx`` (+ ``.targets.*`` for chat) and ``part-NNNNN.json`` (bad-row counts; written last:
  the part is done). Done parts survive a crash and are skipped by the next attempt.
* ``error-<run>-NNNNN.txt``: part NNNNN failed in run <run>; the text is the error every rank raises. The
  error that counts is the one of the first failing part once every part before it is done, so the result
  is the one a single process reading the files in order reports.
* Rank 0 merges the parts in plan order into the entry (megatron_indexed.IndexedWriter.append_dataset; the
  entry's ``.meta.json`` is written last) and removes the parts. The others wait for that ``.meta.json``.

Every wait polls the file system with a deadline (``Share.timeout_s``, trainer.dist_timeout_s) and prints
which ranks it waits for about every 30 s. Nothing here uses a process group.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from trainer.errors import ConfigError
from trainer.data.megatron_indexed import IndexedWriter
from trainer.data.sources import Part, Progress, open_parquet

MIN_PART_BYTES = 1 << 24  # smaller files are not split: a part's fixed cost (tokenizer start, merge) dominates
_REPORT_EVERY_S = 30.0
_LINE_FORMATS = ("jsonl_text", "messages", "sharegpt", "alpaca")

Streams = Sequence[tuple[str, type]]  # (suffix of the indexed dataset, dtype): ("", uint16), (".targets", uint8)
# Tokenize one part into one writer per stream; returns the bad-row counts per file.
PartWork = Callable[[Part, list[IndexedWriter], Progress], dict[str, int]]


@dataclass(frozen=True)
class Share:
    """This process' place among those tokenizing together; ``run_id`` tells this attempt's error markers
    from a crashed earlier attempt's (training broadcasts one per split)."""

    rank: int
    world_size: int
    timeout_s: float
    run_id: str = ""


SOLO = Share(0, 1, math.inf)


# -------------------------------------------------------------------------------------------- planning


def _line_start_after(f, pos: int, block: bool) -> int:
    """The first line start at or after ``pos`` (text: the first after a whitespace-only line, so that a
    blank-line separated block never spans two parts)."""
    f.seek(max(0, pos - 1))
    if pos > 0:
        f.readline()  # to the end of the line holding byte pos - 1
    while block:
        line = f.readline()
        if not line or not line.decode("utf-8", errors="replace").strip():
            break
    return f.tell()


def _split_lines(path: Path, k: int, block: bool) -> list[Part]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        cuts = sorted({min(size, _line_start_after(f, size * j // k, block)) for j in range(1, k)})
    bounds = [0] + [c for c in cuts if 0 < c < size] + [size]
    return [Part(path, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _split_parquet(path: Path, k: int, field: str) -> list[Part]:
    meta = open_parquet(path, field).metadata
    groups = meta.num_row_groups
    if groups <= 1 or k <= 1:
        return [Part(path)]
    rows = [meta.row_group(g).num_rows for g in range(groups)]
    total, acc, cuts = sum(rows), 0, []
    for g, n in enumerate(rows[:-1]):  # cut after group g when the running count passes the next k-th
        acc += n
        if acc * k >= total * (len(cuts) + 1):
            cuts.append(g + 1)
    bounds = [0] + cuts + [groups]
    return [Part(path, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def plan_parts(files: Sequence[Path], fmt: str, n: int, field: str = "text") -> list[Part]:
    """Parts of ``files`` (in order) for ``n`` processes: a file bigger than its share of the total bytes
    (and than MIN_PART_BYTES) is cut into about size / share parts; hf_disk directories stay whole."""
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    target = max(sum(sizes) / max(1, n), MIN_PART_BYTES, 1)
    parts: list[Part] = []
    for path, size in zip(files, sizes):
        k = max(1, math.ceil(size / target)) if n > 1 else 1
        if k > 1 and fmt in _LINE_FORMATS + ("text",):
            parts += _split_lines(path, k, block=fmt == "text")
        elif k > 1 and fmt == "parquet":
            parts += _split_parquet(path, k, field)
        else:
            parts.append(Part(path))
    return parts


def plan_id(parts: Sequence[Part], *extra: str) -> str:
    text = json.dumps([[str(p.path), p.start, p.stop] for p in parts] + list(extra))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def part_bytes(part: Part, fmt: str) -> int:
    """What a part's progress reports add up to (bytes, or a Parquet/HF share of the file size)."""
    if part.path.is_dir():
        return sum(f.stat().st_size for f in part.path.rglob("*") if f.is_file())
    size = part.path.stat().st_size
    if fmt == "parquet" and (part.start or part.stop is not None):
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(part.path).metadata
        stop = meta.num_row_groups if part.stop is None else part.stop
        rows = sum(meta.row_group(g).num_rows for g in range(part.start, stop))
        return int(size * rows / max(1, meta.num_rows))
    return (size if part.stop is None else part.stop) - part.start


# ------------------------------------------------------------------------------------ files of an entry


def write_json_atomic(path: Path, obj: dict) -> None:
    """Readers see no file or the complete one (the marker of a finished entry or part)."""
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def meta_path(stem: Path) -> Path:
    return Path(f"{stem}.meta.json")


def read_meta(stem: Path) -> Optional[dict]:
    """The entry's metadata, or None while it is missing or unreadable."""
    try:
        meta = json.loads(meta_path(stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("bad_rows"), dict) else None


def _merge_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for path, n in more.items():
        into[path] = into.get(path, 0) + n


def _publish(stem: Path, streams: Streams, meta: dict, fill: Callable[[list[IndexedWriter]], dict]) -> dict:
    """One writer per stream for the entry ``stem``, filled by ``fill`` (which returns the bad-row counts),
    then finalized and the meta written last (the entry is complete); on any failure nothing is published."""
    writers = [IndexedWriter(f"{stem}{suffix}", dtype) for suffix, dtype in streams]
    try:
        bad = fill(writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.finalize()
    meta = {**meta, "bad_rows": bad}
    write_json_atomic(meta_path(stem), meta)
    return meta


def write_entry(stem: Path, parts: Sequence[Part], streams: Streams, work: PartWork, meta: dict,
                progress: Progress = None) -> dict:
    """Tokenize ``parts`` in order straight into the entry ``stem`` (one process); returns its meta."""
    def fill(writers: list[IndexedWriter]) -> dict:
        bad: dict[str, int] = {}
        for part in parts:
            _merge_counts(bad, work(part, writers, progress))
        return bad

    return _publish(stem, streams, meta, fill)


def merge_parts(stem: Path, part_stems: Sequence[Path], streams: Streams, meta: dict) -> dict:
    """Concatenate finished parts, in order, into the entry ``stem``; returns its meta."""
    def fill(writers: list[IndexedWriter]) -> dict:
        bad: dict[str, int] = {}
        for ps in part_stems:
            for w, (suffix, _) in zip(writers, streams):
                w.append_dataset(f"{ps}{suffix}")
            _merge_counts(bad, read_meta(ps)["bad_rows"])
        return bad

    return _publish(stem, streams, meta, fill)


def part_stem(parts_dir: Path, i: int) -> Path:
    return parts_dir / f"part-{i:05d}"


def write_part(parts_dir: Path, i: int, part: Part, streams: Streams, work: PartWork,
               progress: Progress = None) -> None:
    """Part i as its own entry (skipped when already done, e.g. by an interrupted earlier attempt)."""
    if read_meta(part_stem(parts_dir, i)) is None:
        write_entry(part_stem(parts_dir, i), [part], streams, work,
                    {"part": [str(part.path), part.start, part.stop]}, progress)


# ------------------------------------------------------------------------------------------ sharing


def _error_path(parts_dir: Path, run_id: str, i: int) -> Path:
    return parts_dir / f"error-{run_id}-{i:05d}.txt"


def _state(parts_dir: Path, n: int, run_id: str, done: set[int]) -> tuple[list[int], Optional[str]]:
    """(parts not done yet, the error that decides the outcome: the first failing part's, once every part
    before it is done). ``done`` remembers finished parts between calls (a done part stays done)."""
    done.update(i for i in range(n) if i not in done and read_meta(part_stem(parts_dir, i)) is not None)
    pending = [i for i in range(n) if i not in done]
    if pending:
        err = _error_path(parts_dir, run_id, pending[0])
        if err.is_file():
            return pending, err.read_text(encoding="utf-8")
    return pending, None


def poll(what: str, share: Share, check: Callable[[], tuple[bool, Optional[str], str]]) -> None:
    """Poll ``check() -> (done, error, note)`` until done, raising ``error`` as a ConfigError once one is
    decided; gives up after ``share.timeout_s`` and says what it waited for (``note``) about every 30 s."""
    start = last_report = time.monotonic()
    delay = 0.05
    while True:
        done, error, note = check()
        if error is not None:
            raise ConfigError(error)
        if done:
            return
        now = time.monotonic()
        if now - start > share.timeout_s:
            raise ConfigError(f"rank {share.rank}: gave up after {now - start:.0f} s (trainer.dist_timeout_s="
                              f"{share.timeout_s:g}) waiting for {note} ({what}); see the other ranks' logs")
        if now - last_report >= _REPORT_EVERY_S:
            print(f"rank {share.rank}: waiting for {note} ({what}), {now - start:.0f} s", file=sys.stderr,
                  flush=True)
            last_report = now
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def _wait(what: str, share: Share, n: int, finished: Callable[[list[int]], bool], parts_dir: Path,
          done: set[int]) -> None:
    def check() -> tuple[bool, Optional[str], str]:
        pending, error = _state(parts_dir, n, share.run_id, done)
        ranks = sorted({i % share.world_size for i in pending})
        note = f"ranks {ranks} tokenizing: {n - len(pending)}/{n} parts done"
        return error is None and finished(pending), error, note

    poll(what, share, check)


def _progress_bar(what: str, total: int, share: Share) -> Optional[tqdm]:
    if share.rank != 0:
        return None  # one bar per job; rank 0's share stands for the others'
    desc = f"tokenizing {what}" + (f" (rank 0's {1 / share.world_size:.0%})" if share.world_size > 1 else "")
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, delay=2.0, file=sys.stderr)


def build_shared(stem: Path, parts: Sequence[Part], fmt: str, streams: Streams, work: PartWork, meta: dict,
                 share: Share, what: str, parts_key: str = "") -> dict:
    """Build the entry ``stem`` from ``parts`` with every process of ``share`` (see the module docstring);
    returns its meta. One process writes the entry directly."""
    mine = [i for i in range(len(parts)) if i % share.world_size == share.rank]
    bar = _progress_bar(what, sum(part_bytes(parts[i], fmt) for i in mine), share)
    progress = bar.update if bar is not None else None
    try:
        if share.world_size == 1:
            return write_entry(stem, parts, streams, work, meta, progress)
        parts_dir = Path(f"{stem}.parts") / plan_id(parts, parts_key)
        parts_dir.mkdir(parents=True, exist_ok=True)
        done: set[int] = set()
        _write_mine(stem, parts_dir, parts, mine, streams, work, share, progress, done)
    finally:
        if bar is not None:
            bar.close()
    n = len(parts)
    if share.rank != 0:
        _wait(what, share, n, lambda _: read_meta(stem) is not None, parts_dir, done)
        return read_meta(stem)
    _wait(what, share, n, lambda pending: not pending, parts_dir, done)
    out = merge_parts(stem, [part_stem(parts_dir, i) for i in range(n)], streams, meta)
    # Everything under <entry>.parts is obsolete now, also parts of attempts with another plan.
    shutil.rmtree(parts_dir.parent, ignore_errors=True)
    return out


def _write_mine(stem: Path, parts_dir: Path, parts: Sequence[Part], mine: list[int], streams: Streams,
                work: PartWork, share: Share, progress: Progress, done: set[int]) -> None:
    """This rank's parts, in order; stops at its first failure (later parts cannot matter any more) after
    leaving the error for the others, and when an earlier part's error has decided the outcome."""
    for i in mine:
        if read_meta(stem) is not None or _state(parts_dir, len(parts), share.run_id, done)[1] is not None:
            return
        try:
            write_part(parts_dir, i, parts[i], streams, work, progress)
        except ConfigError as e:
            _write_text_atomic(_error_path(parts_dir, share.run_id, i), str(e))
            return  # the decided error (this one or an earlier part's) is raised by the wait
        except BaseException as e:
            _write_text_atomic(_error_path(parts_dir, share.run_id, i),
                               f"rank {share.rank} failed tokenizing {parts[i].path}: {type(e).__name__}: {e}")
            raise
