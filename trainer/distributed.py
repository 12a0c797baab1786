"""Process-group start-up from the launcher's environment (torchrun today)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    env = os.environ
    return RankInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_distributed(info: RankInfo, device: torch.device) -> None:
    """gloo on CPU, NCCL on CUDA; nothing at all for a single process."""
    if info.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, **kwargs)


def broadcast_str(value: str) -> str:
    """Rank 0's value on every rank (e.g. an output directory with a timestamp in it)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
