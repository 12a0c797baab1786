"""A full disk, for real: the run's output directory on a small tmpfs (mounted here when this process may mount
one; else these tests are skipped, saying why), filled so that config.yaml, a checkpoint or the HF export does
not fit. Each ends in one line naming the path and the bytes needed and free, exit 5, no partial files, and a
run that finished training keeps its weights. A disk that fills up in the middle of a write (past the free-space
check) is made by tests/faults.py, on one process and on two pipeline stages."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import faults
from tests.integration.test_checkpoint import SMALL

EXIT_NO_SPACE = 5
TINY = ["trainer.eval_every=0", "logging.wandb=false", "trainer.max_steps=2", "optim.warmup_steps=1"]


def _env(tmp: Path, **fault) -> dict:
    return faults.env({**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled",
                       "OMP_NUM_THREADS": "1"}, **fault)


def _train(tmp: Path, out: Path, *overrides: str, nproc: int = 1, **fault) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "trainer"]
           if nproc > 1 else [sys.executable, "-m", "trainer"])
    return subprocess.run(cmd + [f"trainer.output_dir={out}", *overrides], cwd=tmp, env=_env(tmp, **fault),
                          capture_output=True, text=True, timeout=600)


class SmallDisk:
    """A tmpfs mounted at `path`; `leave(n)` fills it up to `n` bytes free."""

    def __init__(self, path: Path, size_mib: int):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            path.rmdir()
            pytest.skip(f"a real full-disk test needs a small tmpfs, and this process cannot mount one "
                        f"({(done.stderr or done.stdout).strip() or 'mount failed'}); the same paths are tested "
                        f"with faults in tests/integration/test_disk_full.py's fault tests")

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def leave(self, n: int) -> None:
        with open(self.path / "filler", "wb") as f:
            f.write(b"\0" * max(0, self.free() - n))
        assert abs(self.free() - n) <= 64 << 10, (self.free(), n)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    disks: list[SmallDisk] = []

    def make(size_mib: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size_mib))
        return disks[-1]
    yield make
    for d in disks:
        d.unmount()


def _one_line(err: str, what: str) -> re.Match:
    lines = [line for line in err.splitlines() if line.startswith("meshtron: no space left on device")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    m = re.match(rf"meshtron: no space left on device for {what} at (\S+): needs (about )?([\d.]+ \w+), "
                 rf"([\d.]+ \w+) free; (.*)", lines[0])
    assert m, lines[0]
    return m


def test_config_yaml_on_a_full_disk(disk, tmp_path):
    d = disk(1)
    d.leave(0)
    run = d.path / "run"
    done = _train(tmp_path, run, *SMALL)
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-3000:]
    m = _one_line(done.stderr, "config.yaml")
    assert m[1] == str(run) and "trainer.output_dir" in m[5]
    assert not run.exists()  # the run made it, so the run removed it: no 0-byte config.yaml left


def test_a_checkpoint_that_does_not_fit_writes_nothing(disk, tmp_path):
    d = disk(32)
    d.leave(4 << 20)  # config.yaml and metrics fit; the tiny model's checkpoint (about 16 MB) does not
    run = d.path / "run"
    done = _train(tmp_path, run, *TINY, "trainer.checkpoint.every_steps=1", "trainer.export_hf=false")
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-3000:]
    m = _one_line(done.stderr, "checkpoint step 1")
    assert m[1] == str(run / "checkpoints") and m[2] and "trainer.checkpoint.keep_last" in m[5]
    assert (run / "config.yaml").stat().st_size > 0
    assert not list((run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else True


def test_the_export_that_does_not_fit_names_the_checkpoint_that_holds_the_weights(disk, tmp_path):
    d = disk(64)
    d.leave(20 << 20)  # the final checkpoint (about 16 MB) fits; the export (about 5 MB) no longer does
    run = d.path / "run"
    done = _train(tmp_path, run, *TINY)
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-3000:]
    m = _one_line(done.stderr, "the HF export")
    assert m[1] == str(run / "hf")
    saved = run / "checkpoints" / "step_2"
    assert f"the trained weights are safe in the checkpoint {saved}" in m[5]
    assert not (run / "hf").exists() and not list(run.glob(".hf*"))
    command = re.search(r"export it with (meshtron-convert meshtron-to-hf .*)$", m[5])[1].split()
    assert command[2:] == ["--checkpoint", str(saved), "--out", str(run / "hf")]
    # Following the advice elsewhere (here: another directory, as if space had been freed) gives the model.
    back = subprocess.run([sys.executable, "-m", "checkpoint_convert", *command[1:4], "--out",
                           str(tmp_path / "hf"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert back.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), back.stderr[-2000:]


def test_a_final_checkpoint_that_does_not_fit_still_exports(disk, tmp_path):
    d = disk(32)
    d.leave(10 << 20)  # the export fits, the checkpoint before it does not
    run = d.path / "run"
    done = _train(tmp_path, run, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert ("warning: checkpoint before the HF export: no space left on device for checkpoint step 2" in out
            and "hf/ will be the only copy of the trained weights" in out), out[-3000:]
    assert (run / "hf" / "model.safetensors").is_file()
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


# ------------------------------------------------------------------- past the check: faults


def test_a_checkpoint_write_that_fills_the_disk_removes_its_partial_directory(tmp_path):
    run = tmp_path / "run"
    done = _train(tmp_path, run, *SMALL, "trainer.max_steps=2", "trainer.checkpoint.every_steps=1",
                  fail_save_step=2, fail_save_errno=errno.ENOSPC)
    assert done.returncode == EXIT_NO_SPACE, done.stderr[-3000:]
    m = _one_line(done.stderr, "checkpoint step 2")
    assert m[2] and "its partial files were removed" in m[5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]


def test_any_other_failed_checkpoint_write_is_exit_4_and_leaves_no_partial_directory(tmp_path):
    run = tmp_path / "run"
    done = _train(tmp_path, run, *SMALL, "trainer.max_steps=2", "trainer.checkpoint.every_steps=1",
                  fail_save_step=2)
    assert done.returncode == 4, done.stderr[-3000:]
    assert "checkpoint of step 2 failed" in done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.pp=2"])], ids=["one-process", "pp2"])
def test_an_export_that_fills_the_disk_midway(tmp_path, nproc, layout):
    """Rank 0's write fails after one tensor; it keeps taking part in the other stage's sends, and every rank
    ends with exit 5 (no rank left waiting in a gather until the timeout)."""
    run = tmp_path / "run"
    overrides = [o for o in SMALL if o != "trainer.export_hf=false"] + ["trainer.max_steps=2", *layout,
                                                                         "trainer.dist_timeout_s=120"]
    done = _train(tmp_path, run, *overrides, nproc=nproc, fail_export_after=1)
    assert done.returncode != 0 and "exitcode  : 5" in done.stderr if nproc > 1 else done.returncode == 5, \
        done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if "no space left on device for the HF export" in x)
    assert "its partial files were removed" in line and "the trained weights are safe in the checkpoint" in line
    assert not (run / "hf").exists() and not list(run.glob(".hf*"))
    assert (run / "checkpoints" / "step_2" / "COMPLETE").is_file()
    shutil.rmtree(run)
