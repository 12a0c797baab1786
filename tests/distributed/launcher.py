"""Run a function on N gloo ranks (CPU) and collect what each rank returns.

    results = run_ranks(world_size, fn, *args)   # fn(rank, world_size, *args) -> picklable

Each rank is a fresh spawned process with MASTER_ADDR/PORT set and a gloo process group initialised;
an exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle, not torch's shared-memory tensor sharing: those handles die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """fn's result per rank; fails on the first rank's error, a rank that dies without a result, or after
    ``timeout`` seconds (naming the ranks still missing) instead of waiting forever on a deadlock."""
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results_q)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, value = results_q.get(timeout=1.0)
        except queue.Empty:
            missing = [r for r in range(world_size) if r not in results]
            dead = {r: procs[r].exitcode for r in missing if procs[r].exitcode is not None}
            if dead:
                time.sleep(1.0)  # a result put just before exiting may still be in the pipe
                if results_q.empty():
                    errors.append(f"rank(s) {sorted(dead)} exited (codes {dead}) without a result")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f} s waiting for rank(s) {missing} (a deadlock, or a "
                              f"collective some rank never reached)")
            continue
        if status == "ok":
            results[rank] = pickle.loads(value)  # our own child's bytes, not outside data
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
