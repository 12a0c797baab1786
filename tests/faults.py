"""Faults on purpose, for tests only: the trainer has no hooks of its own. A test installs these patches in its
own process (`install`) or in the trainer processes it starts (`env`: a sitecustomize on PYTHONPATH reads the
spec from MESHTRON_TEST_FAULTS and patches the trainer's modules as they are imported, before any step runs).

What can be made to happen (Faults' fields) and where it is patched:
- stop_after_step: every rank reports a preemption signal in step N's reduction (trainer.step.step_totals), so
  the run saves a checkpoint and exits 75 as on SIGTERM: a restart without a real signal.
- nan_loss_steps / nan_rank: that rank's loss and first gradient become NaN after forward_backward.
- step_sleep_s: a sleep at the end of every forward_backward (before the step's flags are read), so a test can
  signal a run in the middle of it.
- fail_save_step: the DCP write of that step's checkpoint raises (Checkpointer._writer) an OSError, with errno
  fail_save_errno when set (28, ENOSPC: a full disk).
- fail_export_after: the HF export's shard writer (checkpoint_convert.hf.PlannedShardWriter.add) raises
  OSError(ENOSPC) after this many tensors: a disk that fills up during the export.
- pause_at_save_step / pause_seconds: a sleep between that step's shard write and its commit.
- write_delay_s / write_delay_rank: that rank's background (async) checkpoint write takes this much longer.
- kill_after_commit: SIGKILL this process at the start of the first step after the checkpoint of that step was
  committed (a crash between two saves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ENV = "MESHTRON_TEST_FAULTS"
_SITE = Path(__file__).resolve().parent / "fault_site"
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Faults:
    stop_after_step: int = 0
    nan_loss_steps: list[int] = field(default_factory=list)
    nan_rank: int = 0
    step_sleep_s: float = 0.0
    fail_save_step: int = 0
    fail_save_errno: int = 0
    fail_export_after: int = -1
    pause_at_save_step: int = 0
    pause_seconds: float = 0.0
    write_delay_s: float = 0.0
    write_delay_rank: int = 0
    kill_after_commit: int = 0


def env(base: dict | None = None, **faults) -> dict:
    """An environment for trainer subprocesses (and what they start: torchrun workers, srun tasks) with these
    faults installed."""
    spec = Faults(**faults)  # a misspelt fault fails here, in the test
    base = dict(os.environ if base is None else base)
    path = [str(_SITE), str(_ROOT)] + ([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])
    return {**base, "PYTHONPATH": os.pathsep.join(path), ENV: json.dumps(dataclasses.asdict(spec))}


class _State:
    step = 0  # the step forward_backward is running (resumes start from the loaded checkpoint's step)
    committed: set[int] = set()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def installed(f: Faults):
    """The faults patched into this process for the duration of the block (in-process tests)."""
    undo = install(f)
    try:
        yield
    finally:
        undo()


def install(f: Faults) -> Callable[[], None]:
    """Patch the trainer's step and checkpoint functions in this process; returns the undo."""
    import checkpoint_convert.hf as hf
    import trainer.checkpoint as ck
    import trainer.loop as loop

    _State.step, _State.committed = 0, set()
    forward_backward, step_totals = loop.forward_backward, loop.step_totals
    load, writer, commit = ck.Checkpointer.load, ck.Checkpointer._writer, ck.Checkpointer._commit
    shard_add = hf.PlannedShardWriter.add
    exported = [0]

    def faulty_shard_add(self, *args, **kwargs):
        if exported[0] == f.fail_export_after:
            import errno

            raise OSError(errno.ENOSPC, f"No space left on device (faults: fail_export_after={f.fail_export_after})")
        exported[0] += 1
        return shard_add(self, *args, **kwargs)

    def faulty_forward_backward(pm, *args, **kwargs):
        _State.step += 1
        if f.kill_after_commit and f.kill_after_commit in _State.committed:
            print(f"faults: SIGKILL at step {_State.step}, after the commit of step {f.kill_after_commit}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        local_sum = forward_backward(pm, *args, **kwargs)
        if _State.step in f.nan_loss_steps and _rank() == f.nan_rank:
            local_sum = _inject_nan(local_sum, pm)
        if f.step_sleep_s:
            time.sleep(f.step_sleep_s)
        return local_sum

    def faulty_step_totals(local_sum, grad_norm, doc_loss, signalled, pm, *args, **kwargs):
        if _State.step == f.stop_after_step:
            print(f"faults: stop after step {_State.step} (as if preempted)", flush=True)
            signalled = True
        return step_totals(local_sum, grad_norm, doc_loss, signalled, pm, *args, **kwargs)

    def faulty_load(self, path, *args, **kwargs):
        out = load(self, path, *args, **kwargs)
        _State.step = out[0]
        return out

    def faulty_writer(self, step, tmp):
        w = writer(self, step, tmp)
        if step == f.fail_save_step:
            def write_data(plan, planner):
                what = f"simulated storage failure (faults: fail_save_step={step})"
                raise OSError(f.fail_save_errno, what) if f.fail_save_errno else OSError(what)
            w.write_data = write_data
        elif f.write_delay_s and _rank() == f.write_delay_rank:
            real = w.write_data

            def write_data(plan, planner):
                time.sleep(f.write_delay_s)
                return real(plan, planner)
            w.write_data = write_data
        return w

    def faulty_commit(self, step, *args, **kwargs):
        if step == f.pause_at_save_step and f.pause_seconds > 0:
            print(f"faults: pausing {f.pause_seconds}s before the commit of step {step}", flush=True)
            time.sleep(f.pause_seconds)
        out = commit(self, step, *args, **kwargs)
        _State.committed.add(step)
        return out

    loop.forward_backward, loop.step_totals = faulty_forward_backward, faulty_step_totals
    ck.Checkpointer.load, ck.Checkpointer._writer = faulty_load, faulty_writer
    ck.Checkpointer._commit = faulty_commit
    if f.fail_export_after >= 0:
        hf.PlannedShardWriter.add = faulty_shard_add

    def undo() -> None:
        hf.PlannedShardWriter.add = shard_add
        loop.forward_backward, loop.step_totals = forward_backward, step_totals
        ck.Checkpointer.load, ck.Checkpointer._writer, ck.Checkpointer._commit = load, writer, commit
    return undo


def _inject_nan(local_sum, pm):
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        grad = next(p.grad for p in pm.parameters() if p.grad is not None)
        (grad.to_local() if isinstance(grad, DTensor) else grad).fill_(float("nan"))
    return local_sum * float("nan")


def install_from_env() -> None:
    """sitecustomize's part: patch once trainer.loop has been imported (torch is not imported before)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    import importlib.abc
    import sys

    faults = Faults(**json.loads(spec))

    class _After(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainer.loop":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            found = importlib.util.find_spec(name)
            sys.meta_path.insert(0, self)
            exec_module = found.loader.exec_module

            def exec_then_patch(module):
                exec_module(module)
                sys.modules[name] = module
                sys.meta_path.remove(self)
                install(faults)
            found.loader.exec_module = exec_then_patch
            return found

    sys.meta_path.insert(0, _After())
