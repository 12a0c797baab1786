"""trainer.dist_timeout_s reaches every group the mesh makes, and a peer that never arrives fails the wait.

torch gives DeviceMesh's sub-groups the backend's default timeout (30 min on gloo, 10 on NCCL), not the default
group's; ParallelDims.build_mesh passes ours to each of them.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.distributed

TIMEOUT_S = 3.0


def _mesh_timeouts(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from parallel.dims import FLAT_VIEWS, MESH_AXES, ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, tp=1, pp=1, cp=1, world_size=world_size)
    mesh = dims.build_mesh("cpu", TIMEOUT_S)
    seen = {name: mesh[name].get_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name in (*MESH_AXES, *FLAT_VIEWS)}
    started, error = time.monotonic(), None
    if rank == 0:  # rank 1 never joins this all-reduce
        try:
            dist.all_reduce(torch.ones(1), group=mesh["dp_shard_cp"].get_group())
        except RuntimeError as e:
            error = str(e)
    else:
        time.sleep(2 * TIMEOUT_S)  # alive, just absent, until rank 0 has given up
    return {"timeouts": seen, "error": error, "waited": time.monotonic() - started}


def test_mesh_groups_use_the_configured_timeout_and_fail_a_missing_peer():
    results = run_ranks(2, _mesh_timeouts, timeout=120)
    for r in results:
        assert set(r["timeouts"].values()) == {TIMEOUT_S}, r["timeouts"]
    assert results[0]["error"] and "timed out" in results[0]["error"].lower(), results[0]["error"]
    assert TIMEOUT_S * 0.9 <= results[0]["waited"] < TIMEOUT_S + 10
