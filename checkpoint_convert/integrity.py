"""What makes a meshtron checkpoint directory trustworthy: its COMPLETE file lists every file with its size and
CRC-32, computed by the rank that wrote it right after writing (from the page cache, in the background for
async saves). A resume checks every size (stat only) and, with trainer.checkpoint.verify=full, every checksum;
meshtron-convert checks both before converting.

A checkpoint directory (``step_<N>``):
    .manifest/rank_<r>.json   while saving: {relative path: [size, crc32]} of the files rank r wrote
    COMPLETE                  written last: {"step", "world_size", "time", "files": {relative path: [size, crc32]}}
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional

from trainer.errors import ConfigError

COMPLETE = "COMPLETE"
LATEST = "latest"
MANIFEST_DIR = ".manifest"
_CHUNK = 8 << 20


class DamagedCheckpoint(ConfigError):
    """Files of a checkpoint differ from what its COMPLETE file recorded (or it records none to check)."""


def crc32(path: Path, on_bytes: Optional[Callable[[int], None]] = None) -> int:
    # zlib releases the GIL on large buffers, so a background checksum does not stall the step loop.
    value = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            value = zlib.crc32(view[:n], value)
            if on_bytes is not None:
                on_bytes(n)
    return value


def describe(root: Path, rels: Iterable[str]) -> dict[str, list[int]]:
    return {rel: [(root / rel).stat().st_size, crc32(root / rel)] for rel in rels}


def write_rank_manifest(root: Path, rank: int, rels: Iterable[str]) -> None:
    """Rank `rank`'s files, described; written under a temporary name and renamed, so a manifest is whole."""
    d = root / MANIFEST_DIR
    d.mkdir(exist_ok=True)
    tmp = d / f".rank_{rank:05d}.json.tmp"
    tmp.write_text(json.dumps(describe(root, rels)))
    os.replace(tmp, d / f"rank_{rank:05d}.json")


def write_complete(root: Path, step: int, world_size: int) -> None:
    """Merge every rank's manifest into COMPLETE (fsynced), then drop the manifests: COMPLETE lists every
    file of the directory but itself. A missing manifest means a rank did not finish: no COMPLETE."""
    files: dict[str, list[int]] = {}
    d = root / MANIFEST_DIR
    for r in range(world_size):
        path = d / f"rank_{r:05d}.json"
        if not path.is_file():
            raise OSError(f"rank {r} left no file manifest in {d}: its part of the checkpoint was not written")
        files.update(json.loads(path.read_text()))
    with open(root / COMPLETE, "w") as f:
        json.dump({"step": step, "world_size": world_size, "time": time.time(), "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(d)


def recorded_files(step_dir: Path) -> Optional[dict[str, list[int]]]:
    """COMPLETE's file list; None for a checkpoint written before file lists existed."""
    try:
        record = json.loads((step_dir / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{step_dir / COMPLETE}: unreadable ({e}); the checkpoint cannot be trusted") from e
    if not isinstance(record, dict):
        raise DamagedCheckpoint(f"{step_dir / COMPLETE}: not a JSON object; the checkpoint cannot be trusted")
    return record.get("files")


def check_files(step_dir: Path, files: dict[str, list[int]], checksums: bool, share: tuple[int, int] = (0, 1),
                on_bytes: Optional[Callable[[int], None]] = None) -> list[str]:
    """Problems (one line each) of this share of the recorded files: `share` = (index, count) splits the
    checksum reads between ranks; sizes are all checked by share 0 (a stat each)."""
    index, count = share
    problems = []
    for i, (rel, (size, crc)) in enumerate(sorted(files.items())):
        path = step_dir / rel
        if index == 0 or (checksums and i % count == index):
            try:
                got = path.stat().st_size
            except OSError:
                problems.append(f"{path}: missing (COMPLETE lists it, {size} bytes)")
                continue
            if got != size:
                problems.append(f"{path}: {got} bytes, COMPLETE recorded {size} (truncated or overwritten)")
                continue
        if checksums and i % count == index:
            got_crc = crc32(path, on_bytes)
            if got_crc != crc:
                problems.append(f"{path}: CRC-32 {got_crc:08x}, COMPLETE recorded {crc:08x} (contents damaged)")
    return problems


def total_bytes(files: dict[str, list[int]], share: tuple[int, int] = (0, 1)) -> int:
    index, count = share
    return sum(size for i, (_, (size, _)) in enumerate(sorted(files.items())) if i % count == index)
