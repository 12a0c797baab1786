"""The special tokens and the tokenizer of a Megatron-LM checkpoint, both ways.

HF -> Megatron: the source's HF files other than weights and config.json (tokenizer, chat template,
generation_config.json) are copied into ``hf/`` beside ``release/``, the args say ``tokenizer_type=HuggingFaceTokenizer`` and ``tokenizer_model=<that directory>`` (what
Megatron-LM's HuggingFaceTokenizer loads with AutoTokenizer.from_pretrained), and ``meshtron_token_ids`` keeps
config.json's bos/eos/pad ids exactly: a tokenizer's own ids may differ from its model's config (Qwen2's tokenizer
has no bos token, its config.json has bos_token_id 151643), and a round trip must give back config.json's.

Megatron -> HF, without --hf-config, the ids come from what the checkpoint records, first that applies:
1. ``meshtron_token_ids`` in the args (written by hf-to-megatron);
2. an HF tokenizer: ``hf/`` beside the iterations, or ``tokenizer_model`` when the args say
   HuggingFaceTokenizer and it is a local directory; its bos/eos/pad ids, and its files are copied;
3. ``NullTokenizer``: Megatron's only special token is its end-of-document token, id vocab_size (args).
Otherwise (a hub name we cannot reach, GPT2BPE/SentencePiece/TikToken files, nothing recorded) no ids are
written (null in config.json) and one line says why: guessing would make generation stop on the wrong token.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HF_FILES_DIR = "hf"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Tokenizer files copied with a model (from --hf-config, into and out of hf/).
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def tokenizer_files(src: Path) -> list[Path]:
    """The tokenizer files of an HF directory (none: it ships no tokenizer)."""
    return sorted({f for pattern in TOKENIZER_GLOBS for f in src.glob(pattern) if f.is_file()})


def record_tokenizer(args: argparse.Namespace, hf_config: dict, hf_dir: Path, out: Path) -> list[Path]:
    """Put the special-token ids of `hf_config` (config.json's contents) and the tokenizer's place into `args`;
    returns the files to copy into ``<out>/hf/`` (copy_tokenizer)."""
    args.meshtron_token_ids = {k: hf_config[k] for k in TOKEN_IDS if k in hf_config}
    files = tokenizer_files(hf_dir)
    if files:
        args.tokenizer_model = str(out.resolve() / HF_FILES_DIR)
    if (hf_dir / GENERATION_CONFIG).is_file():
        files.append(hf_dir / GENERATION_CONFIG)
    return files


def copy_tokenizer(files: list[Path], out_tmp: Path) -> None:
    if files:
        dest = out_tmp / HF_FILES_DIR
        dest.mkdir()
        for f in files:
            shutil.copyfile(f, dest / f.name)


@dataclass
class SpecialTokens:
    """What megatron-to-hf writes: config.json's ids (None: null), the directory whose tokenizer files (and
    generation config) are copied, and a line for the user when the ids are unknown."""

    ids: dict = field(default_factory=lambda: dict.fromkeys(TOKEN_IDS))
    source: Optional[Path] = None
    note: Optional[str] = None


def special_tokens(args: argparse.Namespace, root: Path) -> SpecialTokens:
    """The special tokens a Megatron checkpoint records (see the module docstring for the order)."""
    tok_type = getattr(args, "tokenizer_type", None)
    tok_model = getattr(args, "tokenizer_model", None)
    beside = root / HF_FILES_DIR
    local = beside if beside.is_dir() else None
    if local is None and tok_type == "HuggingFaceTokenizer" and tok_model and Path(tok_model).is_dir():
        local = Path(tok_model)
    recorded = getattr(args, "meshtron_token_ids", None)
    if isinstance(recorded, dict):
        return SpecialTokens({k: recorded.get(k) for k in TOKEN_IDS}, local)
    unreadable = ""
    if local is not None and tokenizer_files(local):
        try:
            return SpecialTokens(_tokenizer_ids(local), local)
        except Exception as e:  # transformers' many ways to fail on a tokenizer directory: said, not raised
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            unreadable = f"; transformers cannot load the tokenizer in {local}: {why}"
    if tok_type == "NullTokenizer" and getattr(args, "vocab_size", None):
        return SpecialTokens({"bos_token_id": None, "eos_token_id": int(args.vocab_size), "pad_token_id": None})
    where = (f"tokenizer_model={tok_model!r} is not a local directory" if tok_type == "HuggingFaceTokenizer"
             else f"tokenizer_type={tok_type!r}" + (f" with tokenizer_model={tok_model!r}" if tok_model else "")
             + " is not an HF tokenizer" if tok_type else "its args name no tokenizer") + unreadable
    return SpecialTokens(note=f"no special-token ids written (bos/eos/pad null in config.json) and no tokenizer "
                              f"copied: the checkpoint records none we can read ({where}, no {beside}); pass "
                              f"--hf-config DIR (the model's HF directory) to take both from there")


def _tokenizer_ids(path: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return {k: getattr(tok, k) for k in TOKEN_IDS}


def copy_tokens(tokens: SpecialTokens, tmp: Path) -> None:
    """The tokenizer files (and generation config) of `tokens.source` into the HF output being written."""
    if tokens.source is None:
        return
    files = tokenizer_files(tokens.source)
    if (tokens.source / GENERATION_CONFIG).is_file():
        files.append(tokens.source / GENERATION_CONFIG)
    for f in files:
        shutil.copyfile(f, tmp / f.name)
