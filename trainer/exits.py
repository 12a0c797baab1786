"""How a run that stops on purpose ends: `RunExit` and its exit codes (the table in README, "Checkpoints and
resume"; 2, a configuration error, is trainer/entry.py's). Imports nothing, so trainer/signals.py can use it
before torch loads."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_NONFINITE = 3  # non-finite loss or gradient norm (trainer.nonfinite=stop, or too many skips)
EXIT_CHECKPOINT_FAILED = 4  # a checkpoint (e.g. a background async save) failed
EXIT_NO_SPACE = 5  # no space left (or over quota) for config.yaml, a checkpoint or the HF export: trainer/disk.py
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was saved; requeue the job to resume (sysexits EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention): a checkpoint was saved, or a second one


class RunExit(Exception):
    """The run stops on purpose with this exit code (preemption, non-finite numbers, failed save, full disk)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def resume_hint(output_dir) -> str:
    """How to continue this run: the same command finds its checkpoints only in the same output directory, and
    the default trainer.output_dir is a new timestamped one on every start, so name it unless it was given."""
    given = any(arg.lstrip("+").startswith("trainer.output_dir=") for arg in sys.argv[1:])
    if given:
        return "rerun the same command to resume"
    return (f"to resume, rerun the same command with trainer.output_dir={Path(output_dir).resolve()} (without "
            f"it, a new timestamped output directory starts afresh)")
