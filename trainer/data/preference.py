"""Preference pairs (data.format=preference): rows -> a prompt with a chosen and a rejected completion -> two
cached token sequences per pair, with targets on the completions only.

Row formats (TRL's; one JSON object per line of ``.jsonl`` files, or the records of ``.parquet`` files or of a
``datasets.save_to_disk`` directory):

* explicit prompt, standard: ``{"prompt": str, "chosen": str, "rejected": str}``. The text is prompt +
  completion, tokenized with the tokenizer's special tokens (BOS); TRL appends EOS to a standard completion that
  does not end with it, and so do we: the model learns to stop.
* explicit prompt, conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
  the completions are the assistant's continuation (usually one assistant message).
* implicit prompt: ``{"chosen": [messages], "rejected": [messages]}`` whose common leading messages are the
  prompt (Anthropic-HH style); a pair that shares no leading message is a bad row.

Conversational pairs are rendered with the chat template exactly like SFT (trainer/data/sft.py:
``render_with_spans`` and character offsets, never re-tokenized prefixes); the targets are the completion's
assistant contents and the end-of-turn token after each. prompt + chosen and prompt + rejected are tokenized
whole (TRL tokenizes the prompt alone too and cuts where the two diverge; a single tokenization needs no
cut, and the labels start exactly at the first completion character).

The corpus holds a pair as documents 2i (chosen) and 2i + 1 (rejected), with ``TokenizedCorpus.pairs`` set;
packing (row_index.py) places both in one row. A pair must fit a row: together its two documents give
len(chosen) - 1 + len(rejected) - 1 slots, at most data.seq_len. Longer pairs follow data.overlong here, at
tokenization (the cache key holds data.seq_len): ``truncate`` cuts the shared prompt from the left first (both
documents lose the same tokens, keeping at least one), then the completions from the right, the longer one
first; ``drop`` leaves the pair out and counts it; ``error`` stops naming it. A pair whose chosen or rejected
completion keeps no target token after truncation is a bad row (data.on_bad_row: error names it, skip counts
it), as is a completion that is empty to begin with.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.assets import asset_path
from trainer.config import PREFERENCE_FORMATS, DataConfig, DataSource
from trainer.data.megatron_indexed import IndexedWriter, token_dtype
from trainer.data.sft import (SFTCorpus, BadRow, Message, _load_cached, _special_tokens, _text, _turns, _ROLES,
                              render_with_spans, resolve_chat_template, target_spans, targets_from_offsets)
from trainer.data.pretrain import files_identity
from trainer.data.shared import SOLO, Share, build_shared, plan_parts
from trainer.data.sources import _ROW_BATCH, Part, Progress, jsonl_rows, load_hf_disk, open_parquet, resolve_files
from trainer.data.tokenizer import tokenizer_fingerprint
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

BUNDLED_PREFERENCE_TRAIN = asset_path("preference", "train.jsonl")
BUNDLED_PREFERENCE_VAL = asset_path("preference", "val.jsonl")
CACHE_VERSION = 1
_ENCODE_BATCH = 128  # pairs per tokenizer call
# Counters kept in the cache entry's bad-row counts under names no file has.
TRUNCATED, DROPPED = "<pairs truncated>", "<pairs dropped>"
PromptOrCompletion = Union[str, list[Message]]


@dataclass(frozen=True)
class Pair:
    prompt: PromptOrCompletion
    chosen: PromptOrCompletion
    rejected: PromptOrCompletion

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


# ------------------------------------------------------------------------------------------ formats


def _messages(obj: dict, key: str) -> list[Message]:
    return _turns(obj, key, "role", "content", {r: r for r in _ROLES})


def _completion(obj: dict, key: str) -> list[Message]:
    messages = _messages(obj, key)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"{key!r} has no assistant message: nothing to train on")
    return messages


def _check_not_empty(pair: Pair) -> Pair:
    for key in ("chosen", "rejected"):
        part = getattr(pair, key)
        texts = [part] if isinstance(part, str) else [m["content"] for m in part if m["role"] == "assistant"]
        if not any(texts):
            raise BadRow(f"the {key} completion is empty: nothing to compare")
    return pair


def to_pair(obj: Any) -> Pair:
    """One parsed JSON row as a Pair; raises :class:`BadRow` when it is malformed."""
    return _check_not_empty(_to_pair(obj))


def _to_pair(obj: Any) -> Pair:
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, found {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise BadRow(f"no {' or '.join(repr(k) for k in missing)} field; a preference row needs 'chosen' and "
                     f"'rejected' (and 'prompt', or chosen/rejected messages sharing the prompt); found {sorted(obj)}")
    if "prompt" in obj:
        if isinstance(obj["prompt"], str):
            return Pair(_text(obj["prompt"], "'prompt'"), _text(obj["chosen"], "'chosen'"),
                        _text(obj["rejected"], "'rejected'"))
        return Pair(_messages(obj, "prompt"), _completion(obj, "chosen"), _completion(obj, "rejected"))
    if not isinstance(obj["chosen"], list) or not isinstance(obj["rejected"], list):
        raise BadRow("no 'prompt' field, and 'chosen'/'rejected' are not message lists (an implicit prompt is "
                     "their common leading messages)")
    chosen, rejected = _messages(obj, "chosen"), _messages(obj, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRow("'chosen' and 'rejected' share no leading message, so there is no prompt (implicit-prompt "
                     "rows hold the same prompt messages first; or give a 'prompt' field)")
    if n == len(chosen) or n == len(rejected):
        raise BadRow("'chosen' or 'rejected' has no messages after the prompt they share: nothing to compare")
    pair = Pair(chosen[:n], chosen[n:], rejected[n:])
    for key, part in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if not any(m["role"] == "assistant" for m in part):
            raise BadRow(f"{key!r} has no assistant message after the shared prompt: nothing to train on")
    return pair


# ---------------------------------------------------------------------------------------- rendering


def render_completion(tokenizer: PreTrainedTokenizerBase, prompt: PromptOrCompletion,
                      completion: PromptOrCompletion, template: str) -> tuple[str, list[tuple[int, int]]]:
    """prompt + completion as text and the character spans of the completion's trained content."""
    if isinstance(completion, str):
        eos = tokenizer.eos_token or ""
        if eos and not completion.endswith(eos):
            completion += eos  # TRL's add_eos for standard (non-conversational) rows
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    text, spans = render_with_spans(tokenizer, prompt + completion, template)
    in_prompt = sum(m["role"] == "assistant" for m in prompt)  # spans come in assistant-message order
    return text, spans[in_prompt:]


def fit_pair(chosen: np.ndarray, rejected: np.ndarray, targets_c: np.ndarray, targets_r: np.ndarray,
             seq_len: int) -> tuple[slice, slice, bool]:
    """Token slices of chosen and rejected so that the pair fills at most seq_len slots (data.overlong=
    truncate: the shared prompt from the left first, at least one token kept, then the completions from the
    right, the longer first); and whether anything was cut."""
    a, b = len(chosen), len(rejected)
    excess = a + b - 2 - seq_len
    if excess <= 0:
        return slice(0, a), slice(0, b), False
    # The prompt is the tokens before the first target of each; both documents start with the same prompt.
    first_c = int(np.argmax(targets_c)) if targets_c.any() else a
    first_r = int(np.argmax(targets_r)) if targets_r.any() else b
    shared = min(first_c, first_r)
    k = min(max(shared - 1, 0), -(-excess // 2))
    excess -= 2 * k
    a, b = a - k, b - k
    if excess > 0:
        d = min(excess, abs(a - b))
        a, b = (a - d, b) if a > b else (a, b - d)
        excess -= d
        a, b = a - -(-excess // 2), b - excess // 2
    return slice(k, k + max(a, 0)), slice(k, k + max(b, 0)), True


def _has_label(targets: np.ndarray) -> bool:
    """A target a label can carry: token i is predicted from token i - 1, so token 0 never is."""
    return bool(targets[1:].any())


def tokenize_preference_part(part: Part, writers: list[IndexedWriter], progress: Progress, *,
                             tokenizer: PreTrainedTokenizerBase, template: Optional[str], seq_len: int,
                             overlong: str, on_bad_row: str, reader: str = "jsonl") -> dict[str, int]:
    """Pairs of one part: chosen and rejected token ids (documents 2i, 2i + 1) into ``writers[0]``, their
    0/1 targets into ``writers[1]``; returns the bad rows skipped per file plus the TRUNCATED/DROPPED counts."""
    specials = _special_tokens(tokenizer)
    tokens_out, targets_out = writers
    counts: dict[str, int] = {}
    pending: list[tuple[str, list[str], list[list[tuple[int, int]]], bool]] = []
    path = str(part.path)

    def bad(where: str, problem: str) -> None:
        if on_bad_row != "skip":
            raise ConfigError(f"{where}: {problem} (data.format='preference'; set data.on_bad_row=skip to skip "
                              f"malformed pairs)")
        counts[path] = counts.get(path, 0) + 1

    def flush() -> None:
        texts = [t for _, pair_texts, _, _ in pending for t in pair_texts]
        add_special = [standard for *_, standard in pending for _ in (0, 1)]
        if all(add_special) or not any(add_special):
            enc = tokenizer(texts, add_special_tokens=add_special[0], return_offsets_mapping=True,
                            return_attention_mask=False, verbose=False)
            ids_all, offs_all = enc["input_ids"], enc["offset_mapping"]
        else:  # standard and conversational rows in one batch: tokenize each kind as it needs
            ids_all, offs_all = [], []
            for text, special in zip(texts, add_special):
                enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                                return_attention_mask=False, verbose=False)
                ids_all.append(enc["input_ids"])
                offs_all.append(enc["offset_mapping"])
        for i, (where, pair_texts, pair_spans, standard) in enumerate(pending):
            docs = []
            for j, role in enumerate(("chosen", "rejected")):
                ids = np.asarray(ids_all[2 * i + j], dtype=np.int64)
                offs = np.asarray(offs_all[2 * i + j], dtype=np.int64).reshape(-1, 2)
                spans = pair_spans[j] if standard else target_spans(pair_texts[j], pair_spans[j], specials)
                docs.append((role, ids, targets_from_offsets(offs, spans)))
            empty = next((role for role, _, t in docs if not _has_label(t)), None)
            if empty is not None:
                bad(where, f"the {empty} completion is empty (no token to train on)")
                continue
            (_, ids_c, t_c), (_, ids_r, t_r) = docs
            slots = len(ids_c) + len(ids_r) - 2
            if slots > seq_len:
                if overlong == "error":
                    raise ConfigError(f"{where}: the pair needs {slots} slots (chosen {len(ids_c)} + rejected "
                                      f"{len(ids_r)} tokens, less one each), more than data.seq_len={seq_len}; "
                                      f"set data.overlong=truncate or drop, or raise data.seq_len")
                if overlong == "drop":
                    counts[DROPPED] = counts.get(DROPPED, 0) + 1
                    continue
                cut_c, cut_r, _ = fit_pair(ids_c, ids_r, t_c, t_r, seq_len)
                ids_c, t_c, ids_r, t_r = ids_c[cut_c], t_c[cut_c], ids_r[cut_r], t_r[cut_r]
                lost = next((role for role, t in (("chosen", t_c), ("rejected", t_r)) if not _has_label(t)), None)
                if lost is not None:
                    bad(where, f"the {lost} completion is empty after truncating the pair to data.seq_len="
                               f"{seq_len} (its prompt alone fills the row); raise data.seq_len")
                    continue
                counts[TRUNCATED] = counts.get(TRUNCATED, 0) + 1
            for ids, t in ((ids_c, t_c), (ids_r, t_r)):
                tokens_out.add(ids)
                targets_out.add(t)
        pending.clear()

    for where, obj, problem in preference_rows(part, reader, progress):
        try:
            if problem is not None:
                raise BadRow(problem)
            pair = to_pair(obj)
        except BadRow as e:
            bad(str(where), str(e))
            continue
        if pair.conversational and template is None:
            raise ConfigError(f"{where}: a conversational pair, but the tokenizer has no chat template; set "
                              f"data.chat_template to a .jinja file")
        rendered = [render_completion(tokenizer, pair.prompt, c, template) for c in (pair.chosen, pair.rejected)]
        pending.append((str(where), [t for t, _ in rendered], [s for _, s in rendered], not pair.conversational))
        if len(pending) == _ENCODE_BATCH:
            flush()
    if pending:
        flush()
    return counts


# ------------------------------------------------------------------------------------------- files


def preference_files(path: str) -> tuple[str, tuple[Path, ...]]:
    """(reader, files) of data.path: a datasets.save_to_disk directory (``hf_disk``), ``.parquet`` files, or
    ``.jsonl`` files (a file, a directory searched recursively, or a glob)."""
    p = Path(path).expanduser()
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        return "hf_disk", resolve_files(path, "hf_disk", "data.path")
    parquet = p.suffix == ".parquet" or (p.is_dir() and any(p.rglob("*.parquet")) and not any(p.rglob("*.jsonl")))
    if parquet:
        return "parquet", resolve_files(path, "parquet", "data.path")
    return "jsonl", resolve_files(path, "jsonl_text", "data.path")


def preference_rows(part: Part, reader: str, progress: Progress = None) -> Iterator[tuple[str, Any, Optional[str]]]:
    """(where, row, problem) of every row of a part: JSONL lines ("file:line"), Parquet or hf_disk records
    ("file: row N", numbered from 0 as pyarrow and datasets index them)."""
    if reader == "jsonl":
        yield from jsonl_rows(part, progress)
        return
    path = part.path
    if reader == "parquet":
        pf = open_parquet(path, "chosen")
        meta = pf.metadata
        groups = list(range(part.start, meta.num_row_groups if part.stop is None else part.stop))
        row = sum(meta.row_group(g).num_rows for g in range(part.start))
        per_row = path.stat().st_size / max(1, meta.num_rows)
        batches = pf.iter_batches(batch_size=_ROW_BATCH, row_groups=groups) if groups else iter(())
    else:
        ds = load_hf_disk(path, "data.format=preference from a save_to_disk directory")
        row, per_row = 0, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / max(1, len(ds))
        batches = ds.iter(batch_size=_ROW_BATCH)
    for batch in batches:
        records = batch.to_pylist() if hasattr(batch, "to_pylist") else [dict(zip(batch, v)) for v in zip(*batch.values())]
        for obj in records:
            yield f"{path}: row {row}", obj, None
            row += 1
        if progress is not None:
            progress(int(per_row * len(records)))


# ------------------------------------------------------------------------------------------- corpus


def preference_cache_key(files: tuple[Path, ...], tokenizer: PreTrainedTokenizerBase, template: Optional[str],
                         data_cfg: DataConfig) -> str:
    fields = [f"preference-v{CACHE_VERSION}", f"S={data_cfg.seq_len}", data_cfg.overlong, data_cfg.on_bad_row,
              tokenizer_fingerprint(tokenizer), hashlib.sha256((template or "").encode("utf-8")).hexdigest(),
              files_identity(files, data_cfg.content_hash)]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:32]


def _template(tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig) -> Optional[str]:
    """The chat template, or None where the tokenizer has none and data.chat_template is unset (standard
    rows need none; a conversational row then fails naming the setting)."""
    try:
        return resolve_chat_template(tokenizer, data_cfg)
    except ConfigError:
        if data_cfg.chat_template is not None:
            raise
        return None


def load_preference_corpus(source: DataSource, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                           cache_dir: Path, *, share: Optional[Share] = None) -> SFTCorpus:
    """Chosen/rejected token ids and targets of every pair of ``source`` (``pairs`` set: documents 2i and
    2i + 1), cached by (files, tokenizer, template, seq_len, overlong, on_bad_row) and tokenized by every
    process of ``share`` when missing."""
    if source.format not in PREFERENCE_FORMATS:
        raise ConfigError(f"data.format={source.format!r} is not a preference format; expected one of "
                          f"{list(PREFERENCE_FORMATS)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; preference "
                          f"data needs its character offsets to label the completions (a tokenizer.json directory)")
    reader, files = preference_files(source.path)
    template = _template(tokenizer, data_cfg)
    share = share or SOLO
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / preference_cache_key(files, tokenizer, template, data_cfg)
    name = f"data.path={source.path!r}"
    corpus = _load_cached(stem, name)
    if corpus is None:
        work = functools.partial(tokenize_preference_part, tokenizer=tokenizer, template=template,
                                 seq_len=data_cfg.seq_len, overlong=data_cfg.overlong,
                                 on_bad_row=data_cfg.on_bad_row, reader=reader)
        streams = [("", token_dtype(len(tokenizer))), (".targets", np.uint8)]
        fmt = {"jsonl": "jsonl_text", "parquet": "parquet", "hf_disk": "hf_disk"}[reader]
        build_shared(stem, plan_parts(files, fmt, share.world_size, field="chosen"), fmt, streams, work,
                     {"source": str(source.path), "format": source.format}, share, name)
        corpus = _load_cached(stem, name)
        if corpus is None:
            raise ConfigError(f"preference token cache {stem}.* unreadable right after writing it; is {cache_dir} "
                              f"shared by every rank and not full?")
    corpus.pairs = True
    corpus.truncated = corpus.bad_rows.pop(TRUNCATED, 0)
    corpus.dropped = corpus.bad_rows.pop(DROPPED, 0)
    if corpus.num_docs % 2:
        raise ConfigError(f"preference token cache {stem}.* holds {corpus.num_docs} documents, not whole pairs; "
                          f"delete it to rebuild")
    if corpus.num_docs == 0:
        raise ConfigError(f"{', '.join(map(str, files))} holds no usable preference pairs (malformed rows skipped: "
                          f"{sum(corpus.bad_rows.values())}, overlong pairs dropped: {corpus.dropped})")
    if corpus.truncated or corpus.dropped:
        logger.warning("%s: %d pairs truncated, %d dropped to fit data.seq_len=%d (data.overlong=%s)", name,
                       corpus.truncated, corpus.dropped, data_cfg.seq_len, data_cfg.overlong)
    return corpus
