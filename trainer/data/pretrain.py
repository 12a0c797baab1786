"""Pretraining sources -> TokenizedCorpus: the token cache, the source entry point and the split rules.

Documents come from the format readers in sources.py (text, jsonl_text, parquet, hf_disk) or, for
``megatron``, from a tokenized ``.bin``/``.idx`` pair (megatron_indexed.py). Every format yields a
:class:`TokenizedCorpus` of documents without EOS: the packer (packing.py) appends it.

Text formats are tokenized once per (file contents, tokenizer, format, field) and cached as .npy files
(uint32 tokens, int64 document offsets) plus a small JSON of skipped bad rows, so a rerun or a resumed job
skips tokenization. Megatron files are already tokenized: they are memory-mapped, never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL
from trainer.config import ConfigError, DataConfig, DataSource
from trainer.data.corpus import TokenizedCorpus
from trainer.data.megatron_indexed import read_megatron
from trainer.data.sources import BadRows, OnBad, Source, iter_documents, resolve_files
from trainer.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Bump when the cache layout or the tokenization rule changes, so stale caches are never read.
CACHE_VERSION = 2
_TEXT_FIELD_FORMATS = ("jsonl_text", "parquet", "hf_disk")
_ENCODE_BATCH = 1024  # documents per tokenizer call: large enough for the Rust tokenizer's threads
_PROGRESS_AFTER = 4096  # documents; smaller corpora tokenize in about a second, quietly


# ------------------------------------------------------------------------------------ token cache


def _content_files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs whose contents define a source entry: the file, or every file of a directory."""
    if path.is_dir():
        return [(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()]
    return [(path.name, path)]


def cache_key(source: Source, tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    field = source.text_field if source.format in _TEXT_FIELD_FORMATS else ""
    h.update(f"v{CACHE_VERSION}|{source.format}|{field}|{tokenizer_fingerprint(tokenizer)}".encode())
    for entry in source.files:  # contents and order matter, where the files live does not
        for name, path in _content_files(entry):
            h.update(f"|{name}|{path.stat().st_size}|".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:32]


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # No BOS/EOS from the tokenizer's post-processor: EOS placement is ours. verbose=False silences the
    # "longer than model_max_length" warning, which is about model inputs, not whole documents.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize(source: Source, tokenizer: PreTrainedTokenizerBase,
              bad: Optional[OnBad] = None) -> tuple[np.ndarray, np.ndarray]:
    chunks, lengths, batch, bar = [], [0], [], None

    def flush() -> None:
        for ids in _encode_batch(tokenizer, batch):
            chunks.append(np.asarray(ids, dtype=np.uint32))
            lengths.append(len(ids))
        batch.clear()

    for n, doc in enumerate(iter_documents(source, bad), 1):
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            flush()
        if bar is None and n > _PROGRESS_AFTER:
            bar = tqdm(desc=f"tokenizing {source.name}", unit=" docs", initial=n - 1)
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
    return tokens, np.cumsum(np.asarray(lengths, dtype=np.int64))


def write_atomic(path: Path, write: Callable) -> None:
    """Readers see the old file or the complete new one, never a partial write (concurrent ranks, crashes)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _load_cached(tokens_path: Path, offsets_path: Path,
                 meta_path: Path) -> Optional[tuple[np.ndarray, np.ndarray, dict[str, int]]]:
    if not (tokens_path.is_file() and offsets_path.is_file() and meta_path.is_file()):
        return None
    try:
        tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
        bad_rows = json.loads(meta_path.read_text(encoding="utf-8"))["bad_rows"]
    except (ValueError, OSError, KeyError, TypeError):
        return None  # unreadable: rebuild and overwrite
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens):
        return None
    if not isinstance(bad_rows, dict):
        return None
    return tokens, offsets, bad_rows


def read_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                on_bad_row: str = "error") -> tuple[TokenizedCorpus, dict[str, int]]:
    """Token ids of every document of a text-format ``source`` and the bad rows skipped per file.

    Read from the cache when the same files, format, field and tokenizer were seen. The cache key leaves the
    bad-row policy out: an entry made with ``skip`` that skipped rows is re-read under ``error``, which raises.
    """
    policy = BadRows(on_bad_row)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, tokenizer)
    tokens_path, offsets_path = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.offsets.npy"
    meta_path = cache_dir / f"{key}.meta.json"
    cached = _load_cached(tokens_path, offsets_path, meta_path)
    if cached is None or (cached[2] and policy.policy == "error"):
        tokens, offsets = _tokenize(source, tokenizer, policy)
        meta = json.dumps({"source": source.name, "bad_rows": policy.counts}, indent=1).encode()
        # Offsets last: their presence marks a complete entry (all files derive from the same key).
        save_npy_atomic(tokens_path, tokens)
        write_atomic(meta_path, lambda f: f.write(meta))
        save_npy_atomic(offsets_path, offsets)
        cached = _load_cached(tokens_path, offsets_path, meta_path)
        assert cached is not None, f"token cache {tokens_path} unreadable right after writing it"
    tokens, offsets, bad_rows = cached
    return TokenizedCorpus(source.name, tokens, offsets), bad_rows


def log_bad_rows(bad_rows: dict[str, int]) -> None:
    for path, n in bad_rows.items():
        logger.warning("skipped %d bad row%s in %s (data.on_bad_row=skip)", n, "" if n == 1 else "s", path)


def tokenize_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                    on_bad_row: str = "error") -> TokenizedCorpus:
    """:func:`read_source`, logging a warning per file with skipped bad rows."""
    corpus, bad_rows = read_source(source, tokenizer, cache_dir, on_bad_row)
    log_bad_rows(bad_rows)
    return corpus


# ------------------------------------------------------------------------------------- source entry


def _is_bundled(path: str, which: Path) -> bool:
    return Path(path).expanduser().resolve() == Path(which).resolve()


def data_sources(data_cfg: DataConfig) -> list[DataSource]:
    """The training corpora: ``data.sources``, else the ``data.path``/``format``/``text_field`` shortcut,
    else the bundled corpus (JSONL whatever data.format says)."""
    if data_cfg.sources:
        return list(data_cfg.sources)
    if data_cfg.path is None:
        return [DataSource(path=str(BUNDLED_TRAIN), format="jsonl_text", text_field="text")]
    return [DataSource(path=data_cfg.path, format=data_cfg.format, text_field=data_cfg.text_field)]


def load_source_corpus(source: DataSource, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                       cache_dir: Path, setting: str = "data.path") -> TokenizedCorpus:
    """Documents of one pretraining source (without EOS: the packer appends it).

    Text formats go through the token cache; megatron files are memory-mapped and their ids checked against
    the tokenizer. ``setting`` is how errors name the path, e.g. "data.sources[1].path".
    """
    if _is_bundled(source.path, BUNDLED_TRAIN) or _is_bundled(source.path, BUNDLED_VAL):
        name = f"the bundled {Path(source.path).name}"
    else:
        name = f"{setting}={source.path!r}"
    if source.format == "megatron":
        resolve_files(source.path, "megatron", setting)  # a missing file is named with the setting
        return read_megatron(source.path, vocab_size=len(tokenizer), name=name)
    files = resolve_files(source.path, source.format, setting)
    return tokenize_source(Source(name, files, source.format, source.text_field), tokenizer, cache_dir,
                           data_cfg.on_bad_row)


# -------------------------------------------------------------------------------------------- splits


def held_out_count(num_docs: int, data_cfg: DataConfig, name: str) -> int:
    """How many trailing documents of the training files are held out for validation."""
    n_val = max(1, round(num_docs * data_cfg.val_fraction))
    if num_docs - n_val < 1:
        raise ConfigError(f"{name} has {num_docs} document(s): holding out data.val_fraction="
                          f"{data_cfg.val_fraction} leaves none for training; set data.val_path instead")
    return n_val


def default_cache_dir(data_cfg: DataConfig) -> Path:
    """data.cache_dir, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/meshtron, shared by all runs."""
    if data_cfg.cache_dir is not None:
        return Path(data_cfg.cache_dir).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshtron" / "tokens"
