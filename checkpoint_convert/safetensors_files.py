"""Safetensors checkpoint directories as HF writes them: shards named model-0000i-of-0000N.safetensors (+ the
index) or one model.safetensors, written into a hidden staging directory that is renamed into place whole.

Two writers give the same files: ShardWriter holds one shard's tensors and lets safetensors write them;
PlannedShardWriter lays every file out up front from names, shapes and dtypes and writes each tensor at its
offset as it arrives, holding nothing but that tensor (the streamed export, megatron-to-hf).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from trainer.errors import DamagedFileError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size is of this order

# safetensors' dtype codes; a file's tensors are sorted by dtype (its Rust Dtype enum order, largest first),
# then by name.
ST_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
            torch.int64: "I64"}
ST_DTYPES = {code: dtype for dtype, code in ST_CODES.items()}
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")


def dtype_name(dtypes: Iterable[torch.dtype]) -> str:
    """config.json's `dtype` for tensors of these dtypes: their one floating dtype ("bfloat16"), else float32."""
    floats = {d for d in dtypes if d.is_floating_point}
    return str(floats.pop()).removeprefix("torch.") if len(floats) == 1 else "float32"


class ShardWriter:
    """Safetensors shards written as tensors arrive; named model-0000i-of-0000N (+ index), or model.safetensors
    when one shard holds everything, at `finish`. Holds at most one shard's tensors."""

    def __init__(self, out: Path, max_shard_bytes: int):
        self.out, self.max = out, max_shard_bytes
        self.files: list[tuple[Path, list[str]]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max:  # a tensor larger than a shard gets its own
            self._flush()
        self.pending[name] = t
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending or not self.files:
            self._flush()
        _name_shards(self.out, self.files, self.total)


class PlannedShardWriter:
    """ShardWriter's files (same grouping into shards, names, index, and bytes as safetensors' save_file)
    laid out up front from every tensor's name, shape and dtype, then filled one tensor at a time at its
    offset, in any order: nothing is held but the tensor being written."""

    def __init__(self, out: Path, plan: Mapping[str, tuple[torch.Size, torch.dtype]], max_shard_bytes: int):
        self.out, self.total = out, 0
        shards: list[list[str]] = []
        size = 0
        for name, (shape, dt) in plan.items():  # ShardWriter.add's rule, on sizes alone
            nbytes = math.prod(shape) * dt.itemsize
            if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
            self.total += nbytes
        shards = shards or [[]]  # ShardWriter writes one empty file for no tensors
        self.plan = dict(plan)
        self.where: dict[str, tuple[Path, int]] = {}
        self.files = [(out / f".shard-{i:05d}.safetensors", names) for i, names in enumerate(shards)]
        for path, names in self.files:
            self._lay_out(path, names)
        self.left = set(self.plan)

    def _lay_out(self, path: Path, names: list[str]) -> None:
        order = sorted(names, key=lambda n: (-_ST_ORDER.index(ST_CODES[self.plan[n][1]]), n))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset, starts = 0, {}
        for n in order:
            shape, dt = self.plan[n]
            nbytes = math.prod(shape) * dt.itemsize
            header[n] = {"dtype": ST_CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            starts[n], offset = offset, offset + nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to a multiple of 8 bytes
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)
        for n, start in starts.items():
            self.where[n] = (path, 8 + len(raw) + start)

    def add(self, name: str, t: torch.Tensor) -> None:
        if name not in self.left:
            raise KeyError(f"{name} is not planned or was written already")
        shape, dt = self.plan[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise ValueError(f"{name}: got {list(t.shape)} {t.dtype}, planned {list(shape)} {dt}")
        path, start = self.where[name]
        data = t.detach().cpu().contiguous().reshape(-1)
        fd = os.open(path, os.O_WRONLY)  # a descriptor per write: writers may run in several threads
        try:
            view = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
            while view:  # pwrite may write less than asked (Linux: at most 2 GiB - 4 KiB a call)
                done = os.pwrite(fd, view, start)
                view, start = view[done:], start + done
        finally:
            os.close(fd)
        self.left.discard(name)

    def finish(self) -> None:
        if self.left:
            raise ValueError(f"export ended before these tensors arrived: {sorted(self.left)[:5]} "
                             f"({len(self.left)} in all)")
        _name_shards(self.out, self.files, self.total)


def _name_shards(out: Path, files: list[tuple[Path, list[str]]], total: int) -> None:
    """model.safetensors for one shard; model-0000i-of-0000N.safetensors and the index for more."""
    if len(files) == 1:
        files[0][0].rename(out / SAFE_WEIGHTS)
        return
    weight_map = {}
    for i, (path, names) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    with open(out / SAFE_INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------------ reading

# What a repository cloned without git-lfs holds instead of the weights.
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def open_safetensors(path: Path, stack: ExitStack):
    """safe_open of one file, entered on ``stack``. Opening reads only the header, and safetensors checks there
    that the tensors' offsets cover the file exactly, so a truncated, padded or foreign file fails here,
    before any tensor is read: as a DamagedFileError naming the file, what is wrong and what to do."""
    if not path.is_file():
        raise DamagedFileError(path, "does not exist" if not path.exists() else "is not a file",
                               "the checkpoint is incomplete: copy or download it again")
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as err:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
        if head == _LFS_POINTER:
            raise DamagedFileError(path, "is a Git LFS pointer, not the weights",
                                   f"run `git lfs pull` in {path.parent} (or download the files again)") from None
        why = str(err).removeprefix("Error while deserializing header: ")
        raise DamagedFileError(path, f"not a readable safetensors file ({path.stat().st_size} bytes: {why})",
                               "it is truncated or corrupt: copy, download or export it again") from None


def read_index(path: Path) -> dict[str, str]:
    """tensor name -> shard file name from a model.safetensors.index.json."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
            return weight_map
        problem = "its weight_map is not an object of tensor name -> file name"
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        problem = f"not valid JSON ({' '.join(str(err).split())})"
    except (KeyError, TypeError):
        problem = "has no weight_map"
    raise DamagedFileError(path, problem, "it is truncated or corrupt: copy or download it again")


# ------------------------------------------------------------------------------- output directories


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless `overwrite`."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new output directory"
                              + ("" if not out.is_dir() else " or pass overwrite=True to replace it"))


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling directory to write into, moved to `out` only when the block finishes: an interrupted
    conversion or export never leaves a directory that looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_out_dir(out, overwrite)  # someone may have created it meanwhile
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def byte_progress(total: int, enabled: bool, desc: str) -> tqdm:
    """A progress bar over bytes written (rate in B/s, ETA), on stderr."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an old dst (empty, or overwrite=True) is removed after."""
    if not dst.exists():
        src.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old)
