"""SIGTERM / SIGUSR1 (Slurm's and torchrun's warnings) and a first Ctrl-C only set a flag; training acts on it at a
step boundary: it saves a checkpoint and exits (75 for a preemption, which Slurm requeues; 130 for Ctrl-C).

Installed by the first lines of ``python -m trainer`` (trainer/__main__.py), before torch or Hydra is imported,
so a signal during start-up is never the default "terminate with a traceback": the run exits before its first
step (nothing to save yet) and Slurm still requeues it. A second Ctrl-C exits at once (130) without saving;
one that comes within a second of the first counts as the same press, since under torchrun the terminal's
SIGINT reaches every worker both directly and through the agent. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

from trainer.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED

SAME_PRESS_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C delivered twice (torchrun forwards it)


class PreemptionSignals:
    """The flag: ``received`` once this process got a signal (``name``: the first one's) or heard in the step's
    reduction that another rank did (``elsewhere``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    _installed: Optional["PreemptionSignals"] = None  # the process-wide instance of install()

    def __init__(self, ctrl_c: bool = False):
        self.name: Optional[str] = None
        self.elsewhere = False
        self._first_sigint: Optional[float] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS + ((signal.SIGINT,) if ctrl_c else ()):
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def received(self) -> bool:
        """Signalled here: what this rank contributes to the step's preemption flag."""
        return self.name is not None

    def heard_elsewhere(self) -> None:
        """Another rank was signalled (the step's reduction says so): stop here too."""
        self.elsewhere = True

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.name == "SIGINT" else EXIT_PREEMPTED

    @property
    def what(self) -> str:
        if self.name == "SIGINT":
            return "interrupted by Ctrl-C"
        return f"preempted by {self.name or ('a signal to another rank' if self.elsewhere else 'a signal')}"

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > SAME_PRESS_S:
                _say("meshtron: second Ctrl-C: exiting now, without a checkpoint\n")
                os._exit(EXIT_INTERRUPTED)
            if self._first_sigint is None:
                self._first_sigint = now
                _say("meshtron: Ctrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again to exit "
                     "at once, without one)\n")
        if self.name is None:
            self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @classmethod
    def install(cls) -> "PreemptionSignals":
        """The process-wide handlers, Ctrl-C included, installed once (the entry point's first act)."""
        if cls._installed is None:
            cls._installed = cls(ctrl_c=True)
        return cls._installed

    @classmethod
    def for_run(cls) -> tuple["PreemptionSignals", bool]:
        """(the handlers a training run uses, whether the run owns them and restores them when it ends):
        the process-wide ones when the entry point installed them, else new ones for SIGTERM/SIGUSR1 (train()
        called directly, e.g. from a test or a notebook, keeps its caller's Ctrl-C)."""
        if cls._installed is not None:
            return cls._installed, False
        return cls(), True


def _say(text: str) -> None:
    """One line on stderr from a signal handler (os.write: no buffered stream to re-enter), by one rank."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, text.encode())
