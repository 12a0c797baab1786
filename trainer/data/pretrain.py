"""Pretraining sources -> TokenizedCorpus: the token cache, the source entry point and the split rules.

Documents come from the format readers in sources.py (text, jsonl_text, parquet, hf_disk) or, for
``megatron``, from a tokenized ``.bin``/``.idx`` pair (megatron_indexed.py). Every format yields a
:class:`TokenizedCorpus` of documents without EOS: the packer (packing.py) appends it.

Text formats are tokenized once per (files, tokenizer, format, field) into a token cache in Megatron's
indexed format (``<key>.bin``/``.idx``, memory-mapped when read; uint16 ids below 65500 tokens, else int32)
plus ``<key>.meta.json`` (the bad rows skipped; written last, it marks the entry complete). When the entry is
missing, every process of the job tokenizes its part of the files (shared.py). Megatron files are already
tokenized: they are memory-mapped; their ids are checked against the vocabulary once per (files, vocabulary),
which a ``<key>.vocab<N>.json`` marker in the cache records.

Cache keys (:func:`files_identity`) come from each file's resolved path, size and mtime_ns: cheap (no reads),
and a moved, touched or rewritten file is tokenized again. With ``data.content_hash=true`` they come from each
file's name within its entry, size and a sha256 of its bytes instead: a copy of the corpus elsewhere (another
machine, another directory) reuses the cache and a touched file does not invalidate it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL
from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus
from trainer.data.megatron_indexed import IndexedWriter, prefix_paths, read_megatron, token_dtype
from trainer.data.shared import SOLO, Share, build_shared, plan_parts, poll, read_meta, write_json_atomic
from trainer.data.sources import BadRows, Part, Progress, Source, iter_documents, part_documents, resolve_files
from trainer.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Bump when the cache layout or the tokenization rule changes, so stale caches are never read.
CACHE_VERSION = 3  # 3: Megatron .bin/.idx entries, keys from path/size/mtime
_TEXT_FIELD_FORMATS = ("jsonl_text", "parquet", "hf_disk")
_ENCODE_BATCH = 1024  # documents per tokenizer call: large enough for the Rust tokenizer's threads


# ------------------------------------------------------------------------------------------ cache keys


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256


def _content_hash(path: Path, st: os.stat_result) -> str:
    """sha256 of the file's bytes, once per process and file version."""
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _CONTENT_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _CONTENT_HASHES[memo] = h.hexdigest()
    return _CONTENT_HASHES[memo]


def _entry_files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) pairs that define a source entry: the file, or every file of a directory (hf_disk)."""
    if path.is_dir():
        return [(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()]
    return [(path.name, path)]


def files_identity(entries, content_hash: bool = False) -> str:
    """The identity of the files (in order) a cache entry derives from: resolved path, size and mtime_ns of
    each (stat only); with ``content_hash``, name, size and a hash of the bytes instead (location-free)."""
    parts = []
    for entry in entries:
        for name, path in _entry_files(Path(entry)):
            st = path.stat()
            if content_hash:
                parts.append(f"{name}|{st.st_size}|{_content_hash(path, st)}")
            else:
                parts.append(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}")
        parts.append("/")
    return "\n".join(parts)


def _digest(*fields: str) -> str:
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:32]


def cache_key(source: Source, tokenizer: PreTrainedTokenizerBase, content_hash: bool = False) -> str:
    field = source.text_field if source.format in _TEXT_FIELD_FORMATS else ""
    return _digest(f"v{CACHE_VERSION}", source.format, field, tokenizer_fingerprint(tokenizer),
                   files_identity(source.files, content_hash))


def megatron_key(path: str | Path, content_hash: bool = False) -> str:
    """Identity of an external Megatron .bin/.idx pair (resolved paths, sizes, mtime_ns)."""
    return _digest("megatron", files_identity(prefix_paths(path), content_hash))


# ---------------------------------------------------------------------------------------- tokenizing


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # No BOS/EOS from the tokenizer's post-processor: EOS placement is ours. verbose=False silences the
    # "longer than model_max_length" warning, which is about model inputs, not whole documents.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenize_part(part: Part, writers: list[IndexedWriter], progress: Progress, *,
                  tokenizer: PreTrainedTokenizerBase, fmt: str, field: str, on_bad_row: str,
                  append_eod: bool = False) -> dict[str, int]:
    """Documents of one part into ``writers[0]``; returns the bad rows skipped per file. ``append_eod`` ends
    each document with the tokenizer's EOS (files meant for Megatron-LM; the trainer appends its own)."""
    bad, batch, (out,) = BadRows(on_bad_row), [], writers
    eod = [tokenizer.eos_token_id] if append_eod else []

    def flush() -> None:
        for ids in _encode_batch(tokenizer, batch):
            out.add(ids + eod if eod else ids)
        batch.clear()

    for doc in part_documents(part, fmt, field, bad, progress):
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            flush()
    if batch:
        flush()
    return bad.counts


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


def load_entry(stem: Path, name: str) -> Optional[tuple[TokenizedCorpus, dict]]:
    """A complete cache entry as a memory-mapped corpus and its meta; None when missing or unreadable."""
    meta = read_meta(stem)
    if meta is None:
        return None
    try:
        corpus = read_megatron(stem, name=name)
    except (ConfigError, OSError, ValueError):
        return None  # truncated or corrupt: rebuild and overwrite
    corpus.key = stem.name
    return corpus, meta


def read_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path, on_bad_row: str = "error",
                content_hash: bool = False, share: Optional[Share] = None) -> tuple[TokenizedCorpus, dict[str, int]]:
    """Token ids of every document of a text-format ``source`` and the bad rows skipped per file.

    Read from the cache when the same files, format, field and tokenizer were seen; else tokenized by every
    process of ``share`` (default: this one alone). The cache key leaves the bad-row policy out: an entry
    made with ``skip`` that skipped rows is re-read under ``error``, which raises at the first bad row.
    """
    policy = BadRows(on_bad_row)
    share = share or SOLO
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / cache_key(source, tokenizer, content_hash)
    cached = load_entry(stem, source.name)
    if cached is not None and cached[1]["bad_rows"] and policy.policy == "error":
        for _ in iter_documents(source, policy):  # raises at the first bad row, with its file:line
            pass
        cached = None  # the files no longer have bad rows (rewritten within one mtime tick): rebuild
    if cached is None:
        parts = plan_parts(source.files, source.format, share.world_size, source.text_field)
        work = functools.partial(tokenize_part, tokenizer=tokenizer, fmt=source.format,
                                 field=source.text_field, on_bad_row=policy.policy)
        build_shared(stem, parts, source.format, [("", token_dtype(len(tokenizer)))], work,
                     {"source": source.name, "format": source.format}, share, source.name, policy.policy)
        cached = load_entry(stem, source.name)
        if cached is None:
            raise ConfigError(f"token cache {stem}.* unreadable right after writing it; is {cache_dir} shared "
                              f"by every rank and not full?")
    corpus, meta = cached
    return corpus, meta["bad_rows"]


def log_bad_rows(bad_rows: dict[str, int]) -> None:
    for path, n in bad_rows.items():
        logger.warning("skipped %d bad row%s in %s (data.on_bad_row=skip)", n, "" if n == 1 else "s", path)


def tokenize_source(source: Source, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                    on_bad_row: str = "error", content_hash: bool = False,
                    share: Optional[Share] = None) -> TokenizedCorpus:
    """:func:`read_source`, logging a warning per file with skipped bad rows."""
    corpus, bad_rows = read_source(source, tokenizer, cache_dir, on_bad_row, content_hash, share)
    log_bad_rows(bad_rows)
    return corpus


def read_checked_megatron(path: str | Path, vocab_size: int, name: str, cache_dir: Path,
                          content_hash: bool = False, share: Optional[Share] = None,
                          eos_id: Optional[int] = None) -> TokenizedCorpus:
    """An external Megatron dataset, its ids checked against the vocabulary once per (files, vocabulary, EOS):
    rank 0 scans and records the outcome in a marker; later starts and the other ranks read the marker. The
    scan also finds whether every document already ends with ``eos_id`` (``corpus.eod``, --append-eod)."""
    share = share or SOLO
    key = megatron_key(path, content_hash)
    marker = cache_dir / f"{key}.vocab{vocab_size}.eos{eos_id}.json"
    if not marker.is_file() and share.rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            eod = read_megatron(path, vocab_size=vocab_size, name=name, eos_id=eos_id).eod
        except ConfigError as e:
            write_json_atomic(marker, {"error": str(e)})
            raise
        write_json_atomic(marker, {"ok": True, "eod": eod})
    elif not marker.is_file():
        poll(name, share, lambda: (marker.is_file(), None, "rank 0 checking the token ids"))
    outcome = json.loads(marker.read_text(encoding="utf-8"))
    if "error" in outcome:
        raise ConfigError(outcome["error"])
    corpus = read_megatron(path, name=name)
    corpus.key, corpus.eod = key, bool(outcome.get("eod", False))
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
                       cache_dir: Path, setting: str = "data.path", *,
                       share: Optional[Share] = None) -> TokenizedCorpus:
    """Documents of one pretraining source (without EOS: the packer appends it), with ``key`` set.

    Text formats go through the token cache (tokenized by every process of ``share`` when missing); megatron
    files are memory-mapped and their ids checked once against the tokenizer. ``setting`` is how errors name
    the path, e.g. "data.sources[1].path".
    """
    if _is_bundled(source.path, BUNDLED_TRAIN) or _is_bundled(source.path, BUNDLED_VAL):
        name = f"the bundled {Path(source.path).name}"
    else:
        name = f"{setting}={source.path!r}"
    if source.format == "megatron":
        resolve_files(source.path, "megatron", setting)  # a missing file is named with the setting
        return read_checked_megatron(source.path, len(tokenizer), name, cache_dir, data_cfg.content_hash, share,
                                     tokenizer.eos_token_id)
    files = resolve_files(source.path, source.format, setting)
    return tokenize_source(Source(name, files, source.format, source.text_field), tokenizer, cache_dir,
                           data_cfg.on_bad_row, data_cfg.content_hash, share)


# -------------------------------------------------------------------------------------------- splits


def held_out_count(num_docs: int, data_cfg: DataConfig, name: str) -> int:
    """How many trailing documents of the training files are held out for validation."""
    if num_docs == 0:
        raise ConfigError(f"{name} holds no documents (empty files, or every row blank or skipped): check "
                          f"data.path and data.format")
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
