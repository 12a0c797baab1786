"""A full disk (or a quota reached) ends a run in one line, exit 5 (EXIT_NO_SPACE), with nothing half-written.

Where it can happen, and what is done (README, "Checkpoints and resume"):
- at start, writing config.yaml: written under a temporary name and renamed, so a failed write leaves neither a
  0-byte config.yaml nor an output directory that the run created;
- a checkpoint: its size is checked against the free space before anything is written (the last complete
  checkpoint's size, else the state's), and a write that fails anyway has its `.tmp_step_N/` removed;
- the HF export: its exact size is checked before the first byte; a failed export leaves no partial `hf/`, and
  the trained weights are never lost with it: the run saves a checkpoint of its final step first when there is
  none (trainer.checkpoint.save_before_export) and the message says how to export that checkpoint later.
The message names the path, the bytes needed and free, and what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from trainer.exits import EXIT_NO_SPACE, RunExit

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding `path` (or its nearest existing
    parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def is_no_space(e: Optional[BaseException]) -> bool:
    """Whether `e`, something it was raised from, or one of DCP's per-rank failures is ENOSPC or EDQUOT."""
    seen = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class NoSpace(RunExit):
    """Not enough space for `what` at `path`: exit 5, one line."""

    def __init__(self, what: str, path: Path, needed: Optional[int], advice: str):
        free = free_bytes(path)
        need = f"needs {'about ' if what.startswith('checkpoint') else ''}{size(needed)}, " if needed else ""
        super().__init__(EXIT_NO_SPACE, f"no space left on device for {what} at {path}: {need}{size(free)} free; "
                                        f"{advice}")


def check_space(what: str, path: Path, needed: int, advice: str) -> None:
    """NoSpace before anything is written when `needed` bytes do not fit where `path` will be."""
    if needed > free_bytes(path):
        raise NoSpace(what, path, needed, advice)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole or is left as it was (a temporary sibling renamed over it; removed on error)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
