"""Parameter initialisation that does not depend on the parallel layout.

Each parameter is drawn whole from a generator seeded by (seed, parameter name), then its local part is
copied in. A model sharded by TP, FSDP or PP therefore starts from exactly the weights a single process
would, whatever the mesh, and memory stays bounded by the largest single tensor.
"""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


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
    gen = torch.Generator(device=device).manual_seed(name_seed(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


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
