"""Where start-up time goes: one line, ``ready in X s (import ..., data index ..., model init ..., weights ...)``.

Large jobs spend minutes before their first step; this says which phase took them. "import" runs from the
process's start (as the kernel records it) to the start of training: the interpreter, torch, Hydra composing the
config, and then the set-up before the data (config checks, tokenizer, process group, mesh). "data index" is
reading or building the token caches and packed-row indices; "model init" building this rank's share of the
model and its optimizer; "weights" filling them (HF weights, a checkpoint to resume). The training loop marks
each phase as it passes it.
"""

from __future__ import annotations

import os
import time
from typing import Optional

PHASES = ("import", "data index", "model init", "weights")


def process_start_time() -> Optional[float]:
    """Wall-clock time this process started (Linux /proc), or None where that is not available."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks since boot) follows the command name, which may hold spaces.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_FALLBACK_START = time.time()  # this module is imported early: the best guess without /proc
_claimed = False  # the process start belongs to the first run of a process (trainer.verify runs twice)


class StartupClock:
    """Seconds per start-up phase; ``mark(phase)`` charges the time since the previous mark to ``phase``."""

    def __init__(self, started: Optional[float] = None):
        global _claimed
        if started is None:
            started = time.time() if _claimed else (process_start_time() or _FALLBACK_START)
            _claimed = True
        self.started = started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = self.started
        self.mark("import")

    def mark(self, phase: str) -> None:
        if phase not in self.seconds:
            raise ValueError(f"unknown start-up phase {phase!r}; expected one of {PHASES}")
        now = time.time()
        self.seconds[phase] += max(0.0, now - self._last)
        self._last = now

    def move(self, seconds: float, src: str, dst: str) -> None:
        """Charge ``seconds`` already counted under ``src`` to ``dst`` (a phase nested in another's span)."""
        seconds = min(seconds, self.seconds[src])
        self.seconds[src] -= seconds
        self.seconds[dst] += seconds

    def line(self) -> str:
        total = time.time() - self.started
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"ready in {total:.1f} s ({parts})"
