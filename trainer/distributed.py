"""Process-group start-up from the launcher's environment: torchrun's variables, or Slurm's when srun starts
one task per GPU without torchrun; and the Slurm requeue after a preemption checkpoint."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

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


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """srun sets the step id; the batch shell of an sbatch job (or an salloc shell) does not, although it
    carries SLURM_PROCID=0 and the allocation's SLURM_NTASKS: a plain `python -m trainer` there is one
    process, not task 0 of many."""
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env


def rank_info(env: Optional[Mapping[str, str]] = None) -> RankInfo:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK when present (they win inside an sbatch job running torchrun);
    else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID of an srun step (one task per GPU); else one process."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return RankInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _in_srun_step(env):
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


# ------------------------------------------------------------------------------- Slurm host lists


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. ``node[01-03,7],gpu5`` -> node01 node02 node03 node7 gpu5.

    A small parser of our own rather than ``scontrol show hostnames``: every rank computes the same answer
    without a Slurm client on the compute node's PATH. Ranges keep their zero padding; several bracket
    groups in one name (``rack[1-2]-n[1-2]``) expand as their product, in Slurm's order.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_one(name))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot parse range {item!r} in Slurm host name {name!r}")
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(head + str(n).zfill(width) + rest for rest in _expand_one(tail))
    return out


def slurm_port(job_id: str) -> int:
    """A port every task of the job derives alike, the same one slurm/train.sbatch picks (a requeued job
    keeps its id, so its port)."""
    return 20000 + int(job_id) % 20000


def slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for env:// under srun: what the environment gives, else the first host of
    SLURM_JOB_NODELIST and a port derived from SLURM_JOB_ID. Only the variables missing from env."""
    missing = {}
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("Slurm tasks without MASTER_ADDR need SLURM_JOB_NODELIST to find the head node")
        missing["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job:
            raise RuntimeError("Slurm tasks without MASTER_PORT need SLURM_JOB_ID to derive a port")
        missing["MASTER_PORT"] = str(slurm_port(job))
    return missing


def init_distributed(info: RankInfo, device: torch.device, timeout_s: float = 1800.0) -> None:
    """gloo on CPU, NCCL on CUDA; nothing at all for a single process. ``timeout_s``
    (trainer.dist_timeout_s) bounds every collective of the default group and of the groups made from it
    (DeviceMesh's sub-groups inherit it): a peer that never arrives fails the wait with torch's error
    instead of hanging.

    On CUDA the local rank's device becomes the current one first, even for one process: NCCL, the mesh's
    collectives and every tensor made without an explicit device then land on this rank's GPU, not on GPU 0.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.world_size == 1 or dist.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(slurm_rendezvous(os.environ))  # srun without torchrun: env:// reads these
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def broadcast_str(value: str) -> str:
    """Rank 0's value on every rank (e.g. an output directory with a timestamp in it)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------- Slurm requeue


def requeue_slurm_job(env: Optional[Mapping[str, str]] = None, timeout: float = 60) -> list[str]:
    """After a preemption checkpoint (exit 75): put this Slurm job back in the queue, if it was submitted
    with --requeue (``scontrol show job`` says ``Requeue=1``). Returns log lines; never raises, since the
    checkpoint is already safe and the exit code stays 75 whatever happens here."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return []
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        return [f"slurm: not requeueing job {job}: scontrol is not on PATH"]

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=timeout)

    try:
        shown = call("show", "job", "-o", job)
        if shown.returncode != 0:
            return [f"slurm: not requeueing job {job}: scontrol show job failed: {shown.stderr.strip()}"]
        if not re.search(r"(^|\s)Requeue=1(\s|$)", shown.stdout):
            return [f"slurm: not requeueing job {job}: it was submitted without --requeue (Requeue=0)"]
        done = call("requeue", job)
    except (OSError, subprocess.SubprocessError) as e:
        return [f"slurm: requeue of job {job} failed: {type(e).__name__}: {e}"]
    if done.returncode != 0:
        return [f"slurm: requeue of job {job} failed (scontrol rc {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"]
    return [f"slurm: requeued job {job} (scontrol requeue {job}); it resumes from the latest checkpoint"]
