"""The start-up report: process start from /proc, phases charged in order, and the line's format."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from trainer import startup
from trainer.startup import PHASES, StartupClock, process_start_time


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_process_start_time_matches_ps():
    started = process_start_time()
    elapsed = int(subprocess.run(["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True,
                                 text=True, check=True, timeout=30).stdout)
    assert started is not None and abs((time.time() - started) - elapsed) <= 2


def test_phases_accumulate_and_sum_to_the_total(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(startup.time, "time", lambda: now[0])
    clock = StartupClock(started=990.0)  # the "import" phase: process start -> the clock
    for phase, dt in (("data index", 2.0), ("model init", 3.0), ("weights", 0.5), ("data index", 1.0)):
        now[0] += dt
        clock.mark(phase)
    assert clock.seconds == {"import": 10.0, "data index": 3.0, "model init": 3.0, "weights": 0.5}
    assert clock.line() == "ready in 16.5 s (import 10.0 s, data index 3.0 s, model init 3.0 s, weights 0.5 s)"
    with pytest.raises(ValueError, match="unknown start-up phase 'load'"):
        clock.mark("load")
    assert tuple(clock.seconds) == PHASES


def test_only_the_first_clock_of_a_process_counts_from_the_process_start(monkeypatch):
    monkeypatch.setattr(startup, "_claimed", False)
    monkeypatch.setattr(startup, "process_start_time", lambda: time.time() - 50)
    first, second = StartupClock(), StartupClock()  # e.g. trainer.verify's parallel run, then its single run
    assert first.seconds["import"] >= 49 and second.seconds["import"] < 1


def test_a_nested_phase_moves_out_of_its_parent(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(startup.time, "time", lambda: now[0])
    clock = StartupClock(started=100.0)
    now[0] += 5.0
    clock.mark("model init")
    clock.move(3.5, "model init", "weights")  # HF weights were read inside the model build
    clock.move(9.0, "model init", "weights")  # never more than the parent holds
    assert clock.seconds["model init"] == 0.0 and clock.seconds["weights"] == 5.0
