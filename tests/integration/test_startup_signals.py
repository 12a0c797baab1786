"""A preemption signal during start-up (handlers installed by trainer/__main__.py's first lines, before torch
and Hydra load) exits 75 before the first step, with one line and no traceback, on every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_checkpoint import SMALL
from tests.unit.test_distributed_env import _job_id_with_free_port


def _catches(pid: int, sig: int) -> bool:
    """The process has a handler for `sig` (SigCgt in /proc: bit signum - 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def _signal_once_handled(proc: subprocess.Popen, sig: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _catches(proc.pid, sig):
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer never installed its handler"
        time.sleep(0.005)
    os.kill(proc.pid, sig)


def _env(tmp: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigCgt from Linux /proc")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_during_startup_exits_75_before_the_first_step(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}", *SMALL,
                             "trainer.max_steps=3", "trainer.checkpoint.every_steps=1"], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_once_handled(proc, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, (out[-2000:], err[-3000:])
    assert f"preempted by {signal.Signals(sig).name} on rank(s) [0] during start-up, before step 1: nothing " \
           f"to save yet" in err, err[-3000:]
    assert "Traceback" not in err and "step      1" not in out
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.distributed
def test_a_signal_to_one_rank_during_startup_stops_every_rank(tmp_path):
    """srun-style tasks (as under Slurm): only rank 1 is signalled; both agree and exit 75 before step 1."""
    base = {k: v for k, v in _env(tmp_path).items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    job = _job_id_with_free_port()
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost"}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}",
                                       *SMALL, "trainer.max_steps=3"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    _signal_once_handled(procs[1], signal.SIGTERM)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "preempted by " in log and "on rank(s) [1] during start-up, before step 1" in log, log[-3000:]
        assert "Traceback" not in log
