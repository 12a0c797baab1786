"""Chat SFT data: conversations -> chat-template text -> cached token ids plus a per-token target mask.

Three row formats (one JSON object per line, ``.jsonl``), all normalised to OpenAI-style messages
``[{"role": "system"|"user"|"assistant", "content": str}, ...]``:

* ``messages``: ``{"messages": [{"role", "content"}, ...]}``;
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value"}, ...]}``;
* ``alpaca``: ``{"instruction", "input" (optional), "output"}`` -> user = instruction (+ "\\n\\n" + input when
  input is non-empty), assistant = output.

Targets come from character offsets of the rendered text, never from re-tokenizing prefixes (which breaks
on BPE merges across a turn boundary and on templates that render a prefix differently). Each conversation
is rendered once with its assistant contents replaced by unique markers; the markers give each assistant
content's exact character span, and substituting the real contents back must reproduce the normal
rendering character for character (a template that rewrites contents, e.g. strips them, is refused with an
error rather than masked wrongly). The final text is tokenized once with ``return_offsets_mapping``.

What is a target (``targets[i]`` is True: token i is a label the loss counts when predicted from i - 1):

* every token whose character span overlaps an assistant content span -- a BPE token straddling the start of
  the content (``"\\n "`` when content begins with a space) is a target, since the model must emit it;
* the end-of-turn token right after each assistant content, when the template puts a special token there
  (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3): the model has to learn to stop. The newline the
  template writes after it is not a target; neither are role headers (``<|im_start|>assistant\\n``, which
  the inference prompt supplies), system or user turns.

``data.train_on=last_assistant`` keeps only the last assistant turn of each conversation as targets.
Overlong conversations are kept whole here; the packer applies ``data.overlong`` (lengths are
``corpus.offsets`` differences). No EOS is appended: the end-of-turn token ends a conversation.

The cache entry is two aligned Megatron indexed datasets: ``<key>.bin/.idx`` (token ids) and
``<key>.targets.bin/.idx`` (uint8 0/1 per token, the same sequence lengths), both memory-mapped when read,
plus ``<key>.meta.json`` (bad rows; written last). Missing entries are tokenized by every process of the job
together (shared.py), as pretraining text is.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.assets import asset_path
from trainer.config import DataConfig, DataSource, SFT_FORMATS
from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus
from trainer.data.megatron_indexed import IndexedWriter, read_megatron, token_dtype
from trainer.data.pretrain import files_identity, load_entry
from trainer.data.shared import SOLO, Share, build_shared, plan_parts
from trainer.data.sources import Part, Progress, jsonl_rows, resolve_files
from trainer.data.tokenizer import tokenizer_fingerprint

BUNDLED_SFT_TRAIN = asset_path("sft_chat", "train.jsonl")
BUNDLED_SFT_VAL = asset_path("sft_chat", "val.jsonl")

# Bump when the cache layout or the masking rule changes, so stale caches are never read.
CACHE_VERSION = 2  # 2: aligned Megatron .bin/.idx entries for tokens and targets, keys from path/size/mtime
_ENCODE_BATCH = 256  # conversations per tokenizer call
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}
_MARKER = "\x00meshtron-assistant-{}\x00"  # NUL never occurs in chat text we accept (checked per row)

Message = dict[str, str]


class BadRow(ValueError):
    """A malformed row; the message says what is wrong (file and line are added by the caller)."""


@dataclass
class SFTCorpus(TokenizedCorpus):
    """A :class:`TokenizedCorpus` whose ``targets`` are set, plus how many malformed rows each file skipped
    (``data.on_bad_row=skip``; empty with ``error``, which raises instead)."""

    bad_rows: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # preference pairs cut to data.seq_len at tokenization (trainer/data/preference.py)
    dropped: int = 0  # preference pairs left out for their length (data.overlong=drop)


# ------------------------------------------------------------------------------------------ formats


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{what} is {type(value).__name__}, expected a string")
    if "\x00" in value:
        raise BadRow(f"{what} contains a NUL character")
    return value


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        found = type(turns).__name__ if key in obj else f"no {key!r} field; found {sorted(obj)}"
        raise BadRow(f"expected a non-empty list in {key!r} ({found})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise BadRow(f"{key}[{i}] is not an object with {role_key!r} and {text_key!r}")
        role = turn[role_key]
        if role not in roles:
            raise BadRow(f"{key}[{i}].{role_key}={role!r} is not one of {sorted(roles)}")
        messages.append({"role": roles[role], "content": _text(turn[text_key], f"{key}[{i}].{text_key}")})
    return messages


def _alpaca(obj: dict) -> list[Message]:
    missing = [k for k in ("instruction", "output") if k not in obj]
    if missing:
        raise BadRow(f"no {missing} field(s) for data.format='alpaca'; found {sorted(obj)}")
    user = _text(obj["instruction"], "'instruction'")
    extra = obj.get("input")
    if extra is not None and _text(extra, "'input'"):
        user = f"{user}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj["output"], "'output'")}]


def to_messages(obj: Any, fmt: str) -> list[Message]:
    """One parsed JSON row in ``fmt`` as messages; raises :class:`BadRow` when it is malformed."""
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, found {type(obj).__name__}")
    if fmt == "messages":
        messages = _turns(obj, "messages", "role", "content", {r: r for r in _ROLES})
    elif fmt == "sharegpt":
        messages = _turns(obj, "conversations", "from", "value", _SHAREGPT_ROLES)
    elif fmt == "alpaca":
        messages = _alpaca(obj)
    else:
        raise ConfigError(f"data.format={fmt!r} is not a chat format; expected one of {list(SFT_FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn: nothing to train on")
    return messages


def iter_conversations(path: Union[Path, Part], fmt: str, on_bad_row: str, bad_rows: Optional[dict[str, int]] = None,
                       progress: Progress = None) -> Iterator[list[Message]]:
    """Conversations of one file (or part) in order. A malformed row raises ConfigError naming file and line,
    or with ``on_bad_row="skip"`` is counted in ``bad_rows[str(path)]`` and skipped."""
    if isinstance(path, Part):
        path, part = path.path, path
    else:
        part = Part(Path(path))
    for where, obj, problem in jsonl_rows(part, progress):
        try:
            if problem is not None:
                raise BadRow(problem)
            messages = to_messages(obj, fmt)
        except BadRow as e:
            if on_bad_row != "skip":
                raise ConfigError(f"{where}: {e} (data.format={fmt!r}; set data.on_bad_row=skip "
                                  f"to skip malformed rows)") from e
            if bad_rows is not None:
                bad_rows[str(path)] = bad_rows.get(str(path), 0) + 1
            continue
        yield messages


# ---------------------------------------------------------------------------------------- rendering


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig) -> str:
    """The Jinja source conversations are rendered with: data.chat_template's file, else the tokenizer's."""
    if data_cfg.chat_template is not None:
        path = Path(data_cfg.chat_template).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template={data_cfg.chat_template!r} is not a file; expected a .jinja "
                              f"chat template, or null for the tokenizer's own")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: HF's convention is "default"
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise ConfigError("the tokenizer has no chat template; set data.chat_template to a .jinja file")
    return template


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], template: str) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def render_with_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message], template: str,
                      train_on: str = "all_assistant") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each trained assistant turn's
    content (before any end-of-turn token; see :func:`target_spans`)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marked = [dict(m, content=_MARKER.format(i)) if i in assistant else m for i, m in enumerate(messages)]
    text, spans, pos, out = _render(tokenizer, marked, template), [], 0, []
    for i in assistant:  # markers appear in message order; substitute the real content back, noting where
        marker = _MARKER.format(i)
        at = text.find(marker, pos)
        if at < 0 or text.count(marker) != 1:
            raise ConfigError(f"the chat template renders assistant message {i} {text.count(marker)} times; "
                              f"expected exactly once, in message order")
        out.append(text[pos:at])
        start = sum(map(len, out))
        out.append(messages[i]["content"])
        spans.append((start, start + len(messages[i]["content"])))
        pos = at + len(marker)
    out.append(text[pos:])
    text = "".join(out)
    if text != _render(tokenizer, messages, template):
        raise ConfigError("the chat template changes assistant contents when rendering (e.g. strips or escapes "
                          "them), so their character spans cannot be located; use a template that writes "
                          "message['content'] verbatim (data.chat_template)")
    return text, spans[-1:] if train_on == "last_assistant" else spans


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(specials, key=len, reverse=True)  # longest first: "<|im_end|>" before a shorter prefix


def target_spans(text: str, spans: list[tuple[int, int]], specials: list[str]) -> list[tuple[int, int]]:
    """Content spans extended over a special token written right after them: the end-of-turn marker."""
    out = []
    for start, end in spans:
        eot = next((s for s in specials if text.startswith(s, end)), "")
        out.append((start, end + len(eot)))
    return out


def targets_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """bool per token: its [start, end) character span overlaps one of ``spans``."""
    mask = np.zeros(len(offsets), dtype=bool)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        mask |= (starts < b) & (ends > a)
    return mask


# ------------------------------------------------------------------------------------ tokenization


def tokenize_chat_part(part: Part, writers: list[IndexedWriter], progress: Progress, *,
                       tokenizer: PreTrainedTokenizerBase, fmt: str, template: str, train_on: str,
                       on_bad_row: str) -> dict[str, int]:
    """Conversations of one part: token ids into ``writers[0]``, their 0/1 targets into ``writers[1]``;
    returns the bad rows skipped per file."""
    specials = _special_tokens(tokenizer)
    tokens_out, targets_out = writers
    bad_rows: dict[str, int] = {}
    texts: list[str] = []
    all_spans: list[list[tuple[int, int]]] = []

    def flush() -> None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, verbose=False)
        for ids, offs, text, spans in zip(enc["input_ids"], enc["offset_mapping"], texts, all_spans):
            offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            tokens_out.add(ids)
            targets_out.add(targets_from_offsets(offs, target_spans(text, spans, specials)))
        texts.clear()
        all_spans.clear()

    for messages in iter_conversations(part, fmt, on_bad_row, bad_rows, progress):
        text, spans = render_with_spans(tokenizer, messages, template, train_on)
        texts.append(text)
        all_spans.append(spans)
        if len(texts) == _ENCODE_BATCH:
            flush()
    if texts:
        flush()
    return bad_rows


def sft_cache_key(files: tuple[Path, ...], fmt: str, tokenizer: PreTrainedTokenizerBase, template: str,
                  data_cfg: DataConfig) -> str:
    fields = [f"sft-v{CACHE_VERSION}", fmt, data_cfg.train_on, data_cfg.on_bad_row,
              tokenizer_fingerprint(tokenizer), hashlib.sha256(template.encode("utf-8")).hexdigest(),
              files_identity(files, data_cfg.content_hash)]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:32]


def _load_cached(stem: Path, name: str) -> Optional[SFTCorpus]:
    cached = load_entry(stem, name)
    if cached is None:
        return None
    corpus, meta = cached
    try:
        targets = read_megatron(f"{stem}.targets")
    except (ConfigError, OSError, ValueError):
        return None  # unreadable: rebuild and overwrite
    if targets.tokens.dtype != np.uint8 or not np.array_equal(targets.offsets, corpus.offsets):
        return None
    # 0/1 bytes viewed as bool: still the memory map, nothing read.
    return SFTCorpus(name, corpus.tokens, corpus.offsets, targets.tokens.view(np.bool_), key=corpus.key,
                     bad_rows=meta["bad_rows"])


def load_sft_corpus(source: DataSource, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                    cache_dir: Path, *, share: Optional[Share] = None) -> SFTCorpus:
    """Token ids, targets and conversation offsets of ``source`` (a file, directory of .jsonl files or glob
    in ``source.format``), cached by (files, tokenizer, template, train_on, on_bad_row) and tokenized by every
    process of ``share`` (default: this one alone) when missing."""
    if source.format not in SFT_FORMATS:
        raise ConfigError(f"data.format={source.format!r} is not a chat format; expected one of {list(SFT_FORMATS)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; chat SFT "
                          f"needs its character offsets to mask assistant turns (a tokenizer.json directory)")
    files = resolve_files(source.path, "jsonl_text", "data.path")  # every chat format is .jsonl
    template = resolve_chat_template(tokenizer, data_cfg)
    share = share or SOLO
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / sft_cache_key(files, source.format, tokenizer, template, data_cfg)
    name = f"data.path={source.path!r}"
    corpus = _load_cached(stem, name)
    if corpus is None:
        work = functools.partial(tokenize_chat_part, tokenizer=tokenizer, fmt=source.format, template=template,
                                 train_on=data_cfg.train_on, on_bad_row=data_cfg.on_bad_row)
        streams = [("", token_dtype(len(tokenizer))), (".targets", np.uint8)]
        build_shared(stem, plan_parts(files, source.format, share.world_size), source.format, streams, work,
                     {"source": str(source.path), "format": source.format}, share, name)
        corpus = _load_cached(stem, name)
        if corpus is None:
            raise ConfigError(f"SFT token cache {stem}.* unreadable right after writing it; is {cache_dir} shared "
                              f"by every rank and not full?")
    if corpus.num_docs == 0:
        raise ConfigError(f"{', '.join(map(str, files))} holds no usable conversations "
                          f"(data.format={source.format!r}; malformed rows skipped: {sum(corpus.bad_rows.values())})")
    return corpus
