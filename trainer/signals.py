"""SIGTERM / SIGUSR1 (Slurm's and torchrun's warnings) only set a flag; training acts on it at a step boundary.

Installed by the first lines of ``python -m trainer`` (trainer/__main__.py), before torch or Hydra is imported,
so a signal during start-up is never the default "terminate with a traceback": the run exits 75 before its
first step (nothing to save yet) and Slurm still requeues it. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional


class PreemptionSignals:
    """The flag: ``name`` is the first signal's name (or a note that another rank was signalled)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    _installed: Optional["PreemptionSignals"] = None  # the process-wide instance of install()

    def __init__(self):
        self.name: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @classmethod
    def install(cls) -> "PreemptionSignals":
        """The process-wide handlers, installed once (the entry point's first act)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    @classmethod
    def for_run(cls) -> tuple["PreemptionSignals", bool]:
        """(the handlers a training run uses, whether the run owns them and restores them when it ends):
        the process-wide ones when the entry point installed them, else new ones (train() called directly)."""
        if cls._installed is not None:
            return cls._installed, False
        return cls(), True
