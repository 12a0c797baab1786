"""Which tokenizer a run uses, and the checks that make a bad choice fail before any data is read."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Optional

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainer.assets import BUNDLED_TOKENIZER
from trainer.config import DataConfig
from trainer.errors import ConfigError, DamagedFileError

# Either file marks a directory as an HF tokenizer (slow tokenizers ship only tokenizer_config.json + vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def resolve_tokenizer_path(data_cfg: DataConfig, hf_path: Optional[str]) -> tuple[Path, str]:
    """(directory, which setting chose it): data.tokenizer, else model.hf_path's tokenizer, else the bundled one."""
    if data_cfg.tokenizer is not None:
        path = Path(data_cfg.tokenizer).expanduser()
        if not path.exists():
            raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} does not exist; expected a local HF "
                              f"tokenizer directory containing {' or '.join(_TOKENIZER_FILES)}")
        if not _has_tokenizer(path):
            raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} is not an HF tokenizer directory: "
                              f"expected {' or '.join(_TOKENIZER_FILES)} inside it")
        return path, "data.tokenizer"
    # A model checkpoint without tokenizer files is common (weights-only exports): fall back quietly.
    if hf_path is not None and _has_tokenizer(Path(hf_path).expanduser()):
        return Path(hf_path).expanduser(), "model.hf_path"
    return BUNDLED_TOKENIZER, "bundled"


def load_tokenizer(data_cfg: DataConfig, hf_path: Optional[str]) -> PreTrainedTokenizerBase:
    """The run's tokenizer (see :func:`resolve_tokenizer_path`). It must define an EOS token: documents are
    joined with it, and it is what generation stops on."""
    path, source = resolve_tokenizer_path(data_cfg, hf_path)
    try:
        # local_files_only: a typo must not turn into a hub lookup (compute nodes are often offline).
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors... all mean "unusable"
        _check_json_files(path, source)  # a damaged file is named as such
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConfigError(f"could not load the tokenizer in {path} (from {source}): {reason}") from e
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {path} (from {source}) has no EOS token; set eos_token in its "
                          f"tokenizer_config.json (documents are joined with it)")
    return tok


def _check_json_files(path: Path, source: str) -> None:
    """After a failed load only (a large tokenizer.json takes a while to parse): the first JSON file of the
    directory that does not parse, as a DamagedFileError. transformers' own error does not name the file."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
            raise DamagedFileError(file, f"not valid JSON ({' '.join(str(err).split())}; {file.stat().st_size} "
                                         f"bytes), so the tokenizer chosen by {source} cannot load",
                                   "it is truncated or corrupt: copy or download the tokenizer files again") from None


def check_vocab_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Every token id must index the model's embedding table (which may be padded beyond the tokenizer)."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab_size}; "
                          f"use a larger model.vocab_size or a smaller tokenizer")


_FINGERPRINTS: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: the fast tokenizer's full serialization (normalizer,
    pre-tokenizer, model, added tokens), or for a slow tokenizer its class and vocabulary. Computed once per
    tokenizer object (serializing a large vocabulary takes a while); adding tokens recomputes it."""
    try:
        memo = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # an unhashable tokenizer class: no memo
        return _fingerprint(tokenizer)
    if memo is None or memo[0] != len(tokenizer):
        memo = (len(tokenizer), _fingerprint(tokenizer))
        _FINGERPRINTS[tokenizer] = memo
    return memo[1]


def _fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
