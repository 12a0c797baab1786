"""Parameter initialisation that does not depend on the parallel layout.

Each parameter is drawn whole from a generator seeded by (seed, parameter name), then its local part is
copied in. A model sharded by TP, FSDP or PP therefore starts from exactly the weights a single process
would, whatever the mesh, and memory stays bounded by the largest single tensor.

A shard is not drawn on its own: torch's normal_ consumes its generator over the whole storage in a
kernel-specific pattern (on CPU, blocks of 16 with the tail redrawn; on CUDA, Philox offsets per thread
layout), so reproducing an arbitrary slice bitwise would mean re-implementing each kernel. One full tensor at
a time, dropped before the next, is the bound instead.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard


# Levels that wrappers (activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_LEVELS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_fqn(name: str) -> str:
    """A parameter's name as the plain model has it, whatever wrappers were applied since."""
    for level in _WRAPPER_LEVELS:
        name = name.replace(level, "")
    return name


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normal_like(shape: tuple[int, ...], std: float, seed: int, name: str, device: torch.device) -> torch.Tensor:
    return normal_fill_(torch.empty(shape, device=device), std, seed, name)


def normal_fill_(t: torch.Tensor, std: float, seed: int, name: str) -> torch.Tensor:
    """Fill a contiguous tensor in place with N(0, std) from the (seed, name) generator: the same numbers as
    normal_like of its shape (normal_ draws element by element over the storage, whatever the shape)."""
    gen = torch.Generator(device=t.device).manual_seed(name_seed(seed, name))
    return t.normal_(0.0, std, generator=gen)


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter: a plain tensor, or this rank's part of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full tensor, so slicing needs no communication.
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def local_region(param: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """[(start, stop)] per dim of the global tensor that this rank's part of a DTensor covers; None for a plain
    tensor (the whole of it). Sharded and replicated placements make a box (FSDP's and TP's Shard(0)/Shard(1),
    FSDP over TP's strided shard included, computed by the same function DCP reads slices with)."""
    if not isinstance(param, DTensor):
        return None
    if not all(isinstance(p, (Shard, _StridedShard, Replicate)) for p in param.placements):
        raise ValueError(f"placements {param.placements} do not give this rank a box of the global tensor")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(param.to_local().shape):
        raise ValueError(f"local shape {tuple(param.to_local().shape)} is not the computed {tuple(shape)} "
                         f"for placements {param.placements}")
    return [(o, o + n) for o, n in zip(offset, shape)]
