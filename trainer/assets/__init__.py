"""Files shipped inside the package: a small real-text corpus and the byte-level BPE tokenizer trained on it.

They let the quickstart and the tests train without any download. ``python -m trainer.assets.build_assets``
regenerates both; see that module for where the text comes from and why.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

_ROOT = Path(__file__).resolve().parent


def asset_path(*parts: str) -> Path:
    """Absolute path of a bundled asset, e.g. ``asset_path("corpus", "train.jsonl")``."""
    return _ROOT.joinpath(*parts)


BUNDLED_TOKENIZER = asset_path("tokenizer")
BUNDLED_TRAIN = asset_path("corpus", "train.jsonl")
BUNDLED_VAL = asset_path("corpus", "val.jsonl")


def write_or_check(write: Callable[[Path], None], out_dir: Path, names: list[str], description: str,
                   argv: Optional[list[str]] = None) -> int:
    """A generator's command line: ``write(out_dir)`` in place, or with ``--check`` write into a temporary
    directory and fail (1) when any of ``names`` differs from the committed file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare")
    args = parser.parse_args(argv)
    if not args.check:
        write(out_dir)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        _, mismatch, errors = filecmp.cmpfiles(out_dir, tmp, names, shallow=False)
    if mismatch or errors:
        print(f"differs from a fresh build: {mismatch + errors}", file=sys.stderr)
        return 1
    return 0
