"""Megatron-LM's `torch_dist` checkpoints (megatron-core dist_checkpointing over PyTorch DCP): the format, and
reading its files safely in one process, without megatron or a process group. Names -> tensors and the
conversions: checkpoint_convert.megatron_dist_read (to HF) and megatron_dist_write (from HF).

    latest_checkpointed_iteration.txt   "release" or an iteration number (as for the legacy format)
    release/ or iter_0000100/
        metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1, ...}
        .metadata       DCP's Metadata, pickled: each entry's global shape, dtype, chunks, and where its bytes lie
        __R_I.distcp    the bytes: each tensor chunk one torch.save archive, each object a torch.save'd list
        common.pt       {"args", "iteration", "checkpoint_version", "content_metadata", ...} (core <= 0.18; 0.19
                        stores the same dict as the DCP object "common_state/shard_0_1" and no common.pt)

What megatron-core (GPTModel.sharded_state_dict, 0.16.1) stores, facts the reader and writer rest on:
- Tensors are global, whatever the TP x PP that saved them: linear_qkv is the TP=1 fused QKV (interleaved per
  query group), linear_fc1 is [gate; up] (apply_swiglu_sharded_factory puts rank r's halves at blocks r and
  TP + r of 2 TP), the embedding and output layer hold the saving run's padded vocabulary and load with
  allow_shape_mismatch, so padding rows may differ from the loading run's.
- Per-layer tensors are stacked over layers, `decoder.layers.<rest>` [num_layers, ...] saved in [1, ...] chunks
  (TransformerBlock's sharded offset (0, layer, num_layers)), unless layers are heterogeneous or
  content_metadata says singleton_local_shards: then `decoder.layers.<N>.<rest>`, and fc1 as two tensors
  `linear_fc1.weight_w` (gate) and `linear_fc1.weight_v` (up).
- Norms carry Transformer Engine's names under both layer specs (the local spec's sharded_state_dict_keys_map):
  `self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`.
- Objects are byte entries `<key>/shard_<offset>_<shape>`: every module's `_extra_state` per layer, rng_state,
  optimizer and scheduler state. The reader never reads them: DCP's own planner would unpickle them unrestricted.

`.metadata` is a pickle. It is read here with an unpickler restricted to an allow-list of DCP's metadata classes
(what DCP itself pickles there), torch.Size and dtypes, plus stand-ins for megatron-core's own: MCoreSavePlan
(core <= 0.15, in the all_local_plans megatron-core keeps for plan reuse) and MCoreMetadata (0.15). Nothing else
is rebuilt, and DCP's load is then driven with that metadata (its FileSystemReader would pickle.load the file).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_fs, metadata as dcp_md, planner as dcp_planner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from checkpoint_convert.megatron_format import load_rank_file, megatron_safe_globals, refusal_message
from trainer.errors import ConfigError, DamagedFileError

__all__ = ["read_dcp_metadata", "DcpFiles", "CHECKPOINT_CONFIG"]

CONFIG_FILE, COMMON_FILE, METADATA_FILE = "metadata.json", "common.pt", ".metadata"
COMMON_STATE_KEY = "common_state/shard_0_1"  # core 0.19: ShardedObject("common_state", ..., (1,), (0,))
BACKEND = "torch_dist"
# metadata.json as core 0.16 writes it (CheckpointingConfig); 0.19 drops the common_* fields and ignores them.
CHECKPOINT_CONFIG = {"sharded_backend": BACKEND, "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}


# =============================================================================== .metadata, safely


class MCoreMetadata(dcp_md.Metadata):
    """megatron-core 0.15's Metadata subclass; its extra `mcore_data` (flattened-range shapes) is kept, unused."""


class MCoreSavePlan(dcp_planner.SavePlan):
    """megatron-core <= 0.15's SavePlan subclass, found in the all_local_plans it keeps in .metadata."""


def _dcp_globals() -> dict[str, object]:
    """pickled name -> object, for every global DCP's .metadata holds, under every name torch has used."""
    names = {f"{m.__name__}.{n}": getattr(m, n) for m, ns in (
        (dcp_md, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                  "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
        (dcp_planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        (dcp_fs, ("_StorageInfo",))) for n in ns if hasattr(m, n)}
    old = "torch.distributed._shard.sharded_tensor.metadata."  # torch < 2.4 pickled its TensorProperties
    names.update({old + "TensorProperties": dcp_md.TensorProperties,
                  old + "MEM_FORMAT_ENCODING": dcp_md._MEM_FORMAT_ENCODING,
                  "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata": MCoreMetadata,
                  "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan": MCoreSavePlan,
                  "torch.Size": torch.Size, "torch.serialization._get_layout": torch.serialization._get_layout,
                  "collections.OrderedDict": OrderedDict,
                  # StorageMeta.checkpoint_id: the writer's path. Pure: builds on any OS, touches nothing.
                  **dict.fromkeys(("pathlib.PosixPath", "pathlib._local.PosixPath", "pathlib.PurePosixPath",
                                   "pathlib._local.PurePosixPath"), PurePosixPath)})
    names.update({str(t): t for t in vars(torch).values() if isinstance(t, torch.dtype)})  # "torch.float32"
    return names


DCP_GLOBALS = _dcp_globals()
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class _MetadataUnpickler(pickle.Unpickler):
    """Python's unpickler restricted to DCP_GLOBALS (the pickle documentation's "restricting globals").

    torch's weights-only unpickler, the project's usual tool, cannot read this file: DCP writes it with
    pickle.dump at protocol >= 4 (FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE), opcodes it does not know,
    and torch.load wants a torch.save archive. The same rule holds here: only listed classes are looked up,
    constructed (REDUCE/NEWOBJ) or given state (BUILD); anything else stops the load before it is built."""

    def find_class(self, module: str, name: str):
        obj = DCP_GLOBALS.get(f"{module}.{name}")
        if obj is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} was not an allowed global")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"persistent id {pid!r} was not an allowed global")


def read_dcp_metadata(directory: Path) -> dcp_md.Metadata:
    """DCP's Metadata of `directory`, unpickled with only DCP_GLOBALS allowed.

    A global outside the list -> ConfigError naming it (nothing is run); a truncated, empty or foreign file
    (a Git LFS pointer) -> DamagedFileError."""
    path = directory / METADATA_FILE
    if not path.is_file():
        raise DamagedFileError(path, "is missing (DCP's index of every tensor in the checkpoint)",
                               "copy the whole iteration directory again")
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            blocked = re.findall(r"GLOBAL (\S+?) was not an allowed global", str(e))
            if blocked:
                raise ConfigError(f"{path}: refusing to unpickle {', '.join(blocked)}: not one of the classes "
                                  f"PyTorch DCP or megatron-core keep in checkpoint metadata, and unpickling it "
                                  f"could run code from the file (nothing was run); do not use this checkpoint "
                                  f"unless you trust where it came from") from None
            raise _damaged_metadata(path, str(e).splitlines()[0]) from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
            raise _damaged_metadata(path, f"{type(e).__name__}: {e}") from None
    if not (isinstance(md, dcp_md.Metadata) and isinstance(getattr(md, "state_dict_metadata", None), dict)
            and isinstance(getattr(md, "storage_data", None), dict)):
        raise _damaged_metadata(path, f"holds a {type(md).__name__}, not DCP's Metadata")
    if getattr(md, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
        md.storage_meta = dcp_md.StorageMeta()
    return md


def _damaged_metadata(path: Path, why: str) -> DamagedFileError:
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        return DamagedFileError(path, "is a Git LFS pointer, not the checkpoint metadata",
                                "run `git lfs pull` in the repository holding it (or copy the files again)")
    return DamagedFileError(path, f"is not readable DCP metadata ({path.stat().st_size} bytes: {why})",
                            "copy it again from where Megatron-LM wrote it")


# ================================================================================= DCP, driven here


class _Reads(dcp_planner.LoadPlanner):
    """DCP load plan for one region of one tensor (into `dest`) or for raw object bytes (kept as BytesIO)."""

    def __init__(self, items: Callable[[dcp_md.Metadata], list[dcp_planner.ReadItem]], dest=None):
        self.make_items, self.dest, self.bytes = items, dest, {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> dcp_planner.LoadPlan:
        return dcp_planner.LoadPlan(self.make_items(self.metadata))

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.bytes[read_item.dest_index.fqn] = value

    def resolve_tensor(self, read_item) -> torch.Tensor:
        t = self.dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of dest: the data is already there


class _Reader(dcp_fs.FileSystemReader):
    """DCP's file reader with the metadata read above instead of its own pickle.load."""

    def __init__(self, path: Path, metadata: dcp_md.Metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class DcpFiles:
    """One DCP directory, read here: its metadata (above), and single tensor regions or objects loaded through
    DCP's own reader and planner protocol, one load each, so only what is asked for is ever in memory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.metadata = read_dcp_metadata(directory)
        self._check_files()
        self.reader = _Reader(directory, self.metadata)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, dcp_md.TensorStorageMetadata)}

    def _check_files(self) -> None:
        """Every data file .metadata names is there and long enough: found before anything is written."""
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            path = self.dir / name
            if not path.is_file():
                raise DamagedFileError(path, "is missing", "copy the whole iteration directory again")
            if path.stat().st_size < end:
                raise DamagedFileError(path, f"is truncated ({path.stat().st_size} bytes; .metadata places data up "
                                             f"to byte {end})", "copy it again from where Megatron-LM wrote it")

    def tensor(self, key: str, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor `key`, whatever chunks it was saved in."""
        dest = torch.empty(sizes, dtype=self.tensors[key].properties.dtype)
        wanted = dcp_md.ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))

        def items(metadata):
            found = create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [wanted])
            if sum(math.prod(i.lengths) for i in found) != dest.numel():  # DCP would leave the rest unset
                raise DamagedFileError(self.dir / METADATA_FILE, f"its chunks of {key} "
                                       f"{list(self.tensors[key].size)} do not cover offsets {offsets} sizes "
                                       f"{sizes}", "copy the checkpoint again")
            return found

        self._load(_Reads(items, dest))
        return dest

    def object_bytes(self, key: str) -> io.BytesIO:
        """An object entry's raw bytes (megatron-core's torch.save of a list), not unpickled."""
        index = dcp_md.MetadataIndex(key)
        item = dcp_planner.ReadItem(dcp_planner.LoadItemType.BYTE_IO, index, torch.Size([0]), index,
                                    torch.Size([0]), torch.Size([0]))
        reads = _Reads(lambda md: [item])
        self._load(reads)
        return reads.bytes[key]

    def _load(self, reads: _Reads) -> None:
        """One DCP load in this process (no process group). DCP wraps failures; a chunk whose pickle torch's
        weights-only load refuses -> ConfigError, a data file missing or unreadable -> DamagedFileError."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # the intent, here
                dcp.load({}, storage_reader=self.reader, planner=reads, no_dist=True)
        except dcp.CheckpointException as e:
            error = next(iter(e.failures.values()))[0]
            if isinstance(error, (ConfigError, KeyError)):  # ours, raised while planning
                raise error from None
            data = self.metadata.storage_data
            files = sorted({data[i.storage_index].relative_path for i in reads.make_items(self.metadata)
                            if i.storage_index in data})
            where = ", ".join(str(self.dir / f) for f in files) or str(self.dir)
            blocked = re.findall(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", str(error))
            if isinstance(error, pickle.UnpicklingError) and blocked:
                raise ConfigError(f"{where}: refusing to unpickle {', '.join(blocked)} in a tensor chunk (torch.load "
                                  f"weights_only=True; nothing was run)") from None
            if isinstance(error, FileNotFoundError):
                raise DamagedFileError(where, "is missing", "copy the whole iteration directory again") from None
            first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise DamagedFileError(where, f"is truncated or corrupt (a chunk .metadata places there does not load: "
                                   f"{first})", "copy it again from where Megatron-LM wrote it") from None


# ================================================================================ metadata.json, args


def check_config(directory: Path) -> None:
    """metadata.json says torch_dist, else DamagedFileError / ConfigError."""
    path = directory / CONFIG_FILE
    try:
        backend = json.loads(path.read_text()).get("sharded_backend")
    except FileNotFoundError:
        raise DamagedFileError(path, "is missing", "expected a Megatron-LM torch_dist iteration directory "
                                                   "(metadata.json, .metadata, __*.distcp)") from None
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise DamagedFileError(path, f"is not megatron-core's checkpoint config ({e})",
                               "copy it again from where Megatron-LM wrote it") from None
    if backend != BACKEND:
        raise ConfigError(f"{path} says sharded_backend={backend!r}; only {BACKEND!r} is supported")


def read_common_state(files: DcpFiles) -> dict:
    """args, iteration, checkpoint_version: from common.pt (core <= 0.18) or the common_state object in the DCP
    files (0.19), either way with torch.load(weights_only=True) and Megatron-LM's own allow-list."""
    if (files.dir / COMMON_FILE).is_file():
        return load_rank_file(files.dir / COMMON_FILE)
    if COMMON_STATE_KEY not in files.metadata.state_dict_metadata:
        raise DamagedFileError(files.dir / COMMON_FILE, f"is missing, and .metadata has no {COMMON_STATE_KEY} "
                               "either (where the args are)", "copy the whole iteration directory again")
    where = f"{files.dir / METADATA_FILE} entry {COMMON_STATE_KEY}"
    raw = files.object_bytes(COMMON_STATE_KEY)
    with megatron_safe_globals():
        try:  # torch.save([common state dict]) by megatron-core's ShardedObject writer
            common = torch.load(raw, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(refusal_message(raw, str(e), where=where)) from None
        except RuntimeError as e:
            raise DamagedFileError(where, f"is truncated or corrupt ({str(e).splitlines()[0]})",
                                   "copy the checkpoint again") from None
    if not (isinstance(common, list) and common and isinstance(common[0], dict)):
        raise DamagedFileError(where, "is not megatron-core's common state", "copy the checkpoint again")
    return common[0]
