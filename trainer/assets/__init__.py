"""Files shipped inside the package: a small real-text corpus and the byte-level BPE tokenizer trained on it.

They let the quickstart and the tests train without any download. ``python -m trainer.assets.build_assets``
regenerates both; see that module for where the text comes from and why.
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def asset_path(*parts: str) -> Path:
    """Absolute path of a bundled asset, e.g. ``asset_path("corpus", "train.jsonl")``."""
    return _ROOT.joinpath(*parts)


BUNDLED_TOKENIZER = asset_path("tokenizer")
BUNDLED_TRAIN = asset_path("corpus", "train.jsonl")
BUNDLED_VAL = asset_path("corpus", "val.jsonl")
