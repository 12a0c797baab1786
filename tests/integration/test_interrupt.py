"""Ctrl-C and the resume advice, through the CLI on one process: a first Ctrl-C stops at the step boundary with a
checkpoint and exit 130, naming a command that resumes (the default output directory is new on every start);
a second Ctrl-C exits at once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import faults
from tests.integration.test_checkpoint import SMALL


def _start(tmp: Path, *overrides: str, **fault) -> subprocess.Popen:
    env = faults.env({**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled",
                      "OMP_NUM_THREADS": "1"}, **fault)
    return subprocess.Popen([sys.executable, "-m", "trainer", *SMALL, *overrides], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, tmp: Path, steps: int, timeout: float = 300) -> Path:
    """The run directory once its metrics.jsonl has `steps` rows (the default output_dir is outputs/<time>)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = list((tmp / "outputs").glob("*/metrics.jsonl")) if (tmp / "outputs").exists() else []
        if found and len(found[0].read_text().splitlines()) >= steps:
            return found[0].parent
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {steps} steps logged within {timeout:.0f} s")


def test_ctrl_c_checkpoints_exits_130_and_names_a_command_that_resumes(tmp_path):
    proc = _start(tmp_path, "trainer.max_steps=50", step_sleep_s=0.5)
    run = _wait_for_steps(proc, tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again to exit at once" in err
    stop = re.search(r"meshtron: interrupted by Ctrl-C at step (\d+): checkpoint saved under (\S+); to resume, rerun "
                     r"the same command with (trainer\.output_dir=\S+) \(without it, a new timestamped output "
                     r"directory starts afresh\)", err)
    assert stop, err[-3000:]
    step, override = int(stop[1]), stop[3]
    assert Path(stop[2]) == run.resolve() / "checkpoints" and (run / "checkpoints" / f"step_{step}").is_dir()
    assert override == f"trainer.output_dir={run.resolve()}"

    # The advice, followed: the same overrides plus the named output directory resume at that step.
    resumed = _start(tmp_path, "trainer.max_steps=" + str(step + 2), *shlex.split(override))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {run.resolve() / 'checkpoints' / f'step_{step}'} at step {step}" in out
    assert "torch.distributed is disabled" not in err  # DCP's one-process warning, which no user can act on
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path):
    proc = _start(tmp_path, "trainer.max_steps=50", step_sleep_s=8)  # a step that outlasts both presses (1.5 s apart)
    run = _wait_for_steps(proc, tmp_path, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # later than the same press delivered twice (torchrun forwards it)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, err[-3000:]
    assert "second Ctrl-C: exiting now, without a checkpoint" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_*"))
