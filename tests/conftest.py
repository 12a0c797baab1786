import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never talk to wandb's servers and never write to the user's caches.
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def compose():
    """compose(*overrides) -> typed Config from conf/, as `python -m trainer` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from trainer.config_io import to_config

    def _compose(*overrides: str):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return to_config(hydra_compose("config", overrides=list(overrides)))

    return _compose
