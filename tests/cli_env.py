"""The environment for a CLI subprocess (``python -m trainer``, torchrun) that a test starts from any cwd."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli_env(tmp: Path, **extra: str) -> dict:
    """os.environ with the checkout first on PYTHONPATH (so ``-m trainer`` imports where meshtron is not
    pip-installed, e.g. a GPU machine given only the checkout), caches under ``tmp``, wandb off, plus ``extra``."""
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "XDG_CACHE_HOME": str(tmp / "cache"),
            "WANDB_MODE": "disabled", **extra}
