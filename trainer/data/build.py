"""From the data config to the trainer's batches: sources -> tokenized corpora -> row indices -> blend.

Each source is read in its own format (pretraining text, Parquet, HF datasets, Megatron indexed files, or
chat SFT), becomes a TokenizedCorpus, and is packed on its own (concatenate-and-chunk for pretraining,
best-fit-decreasing for conversations) into a RowIndex: an O(documents) index cached beside the tokens, whose
rows are built only when a batch draws them. Sources are then blended by weight. Validation comes from
`data.val_path`, the bundled validation files, or the last `data.val_fraction` of each source's documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from trainer.config import CHAT_FORMATS, PREFERENCE_FORMATS, SFT_FORMATS, DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data.corpus import TokenizedCorpus
from trainer.data.loader import Blend
from trainer.data.packing import IGNORE_INDEX, PAD_DOC, PackedRows
from trainer.data.pretrain import data_sources, held_out_count, load_source_corpus, log_bad_rows
from trainer.data.row_index import ConcatRows, LazyRows, RowIndex, build_rows
from trainer.data.preference import BUNDLED_PREFERENCE_TRAIN, BUNDLED_PREFERENCE_VAL, load_preference_corpus
from trainer.data.sft import BUNDLED_SFT_TRAIN, BUNDLED_SFT_VAL, load_sft_corpus
from trainer.assets import BUNDLED_TRAIN, BUNDLED_VAL

# A bundled training file and its validation twin: the held-out split is a separate file, not a tail.
_BUNDLED_VAL = {str(BUNDLED_TRAIN): BUNDLED_VAL, str(BUNDLED_SFT_TRAIN): BUNDLED_SFT_VAL,
                str(BUNDLED_PREFERENCE_TRAIN): BUNDLED_PREFERENCE_VAL}
ROW_INDEX_DIR = "rows"  # row indices live in this subdirectory of the token cache


@dataclass
class SplitData:
    rows: Union[RowIndex, ConcatRows, Blend]
    stats: list[dict]  # per source: name, rows, packing efficiency, truncated, dropped


def load_corpus(source: DataSource, tokenizer, data_cfg: DataConfig, cache_dir: Path, setting: str,
                share=None) -> TokenizedCorpus:
    """``share`` (how ranks split a tokenization, trainer.data.shared) goes to the source loaders unchanged."""
    if source.format in PREFERENCE_FORMATS:
        corpus = load_preference_corpus(source, tokenizer, data_cfg, cache_dir, share=share)
        log_bad_rows(corpus.bad_rows)
        return corpus
    if source.format in SFT_FORMATS:
        corpus = load_sft_corpus(source, tokenizer, data_cfg, cache_dir, share=share)
        log_bad_rows(corpus.bad_rows)
        return corpus
    return load_source_corpus(source, tokenizer, data_cfg, cache_dir, setting, share=share)


def _bundled_val(source: DataSource):
    return _BUNDLED_VAL.get(str(Path(source.path).expanduser().resolve()))


def has_val_split(data_cfg: DataConfig) -> bool:
    """A validation split exists: data.val_path, a held-out fraction, or bundled sources (own val files)."""
    if data_cfg.val_path is not None or data_cfg.val_fraction > 0:
        return True
    return all(_bundled_val(s) is not None for s in data_sources(data_cfg))


def _doc_range(corpus: TokenizedCorpus, data_cfg: DataConfig, split: str, own_val_file: bool) -> tuple[int, int]:
    """Documents of `corpus` in the split: all of them when validation lives elsewhere, else a tail is held out."""
    if own_val_file or data_cfg.val_path is not None:
        return 0, corpus.num_docs
    if data_cfg.val_fraction == 0:
        if split == "val":
            raise ConfigError(f"{corpus.name} has no validation split: data.val_fraction=0 and data.val_path is "
                              "unset; set one of them, or trainer.eval_every=0")
        return 0, corpus.num_docs
    if corpus.pairs:  # whole pairs: documents 2i and 2i + 1 stay on one side
        cut = corpus.num_docs - 2 * held_out_count(corpus.num_docs // 2, data_cfg, corpus.name)
    else:
        cut = corpus.num_docs - held_out_count(corpus.num_docs, data_cfg, corpus.name)
    return (0, cut) if split == "train" else (cut, corpus.num_docs)


def _pack(corpus: TokenizedCorpus, data_cfg: DataConfig, eos_id: int, base: int, span: tuple[int, int],
          source: DataSource, cache_dir: Path) -> RowIndex:
    eos = None if source.format in CHAT_FORMATS else eos_id
    return build_rows(corpus, data_cfg.seq_len, eos, packing=data_cfg.packing, overlong=data_cfg.overlong,
                      sample_id_base=base, start=span[0], stop=span[1], cache_dir=cache_dir / ROW_INDEX_DIR)


def build_split(data_cfg: DataConfig, tokenizer, split: str, cache_dir: Path, share=None) -> SplitData:
    """Row indices of the train split (blended when several sources) or of the validation split.

    ``share`` is passed to the corpus loaders unchanged (see load_corpus)."""
    sources = data_sources(data_cfg)
    packed, base = [], 0
    if split == "val" and data_cfg.val_path is not None:
        first = sources[0]
        val = DataSource(path=data_cfg.val_path, format=first.format, text_field=first.text_field)
        corpus = load_corpus(val, tokenizer, data_cfg, cache_dir, "data.val_path", share=share)
        packed.append(_pack(corpus, data_cfg, tokenizer.eos_token_id, 0, (0, corpus.num_docs), val, cache_dir))
    else:
        for i, source in enumerate(sources):
            setting = f"data.sources[{i}].path" if data_cfg.sources else "data.path"
            bundled_val = _bundled_val(source)
            if split == "val" and bundled_val is not None:
                source = DataSource(path=str(bundled_val), format=source.format, text_field=source.text_field)
            corpus = load_corpus(source, tokenizer, data_cfg, cache_dir, setting, share=share)
            span = _doc_range(corpus, data_cfg, split, bundled_val is not None)
            packed.append(_pack(corpus, data_cfg, tokenizer.eos_token_id, base, span, source, cache_dir))
            base += corpus.num_docs
    for rows in packed:
        if rows.num_rows == 0:
            raise ConfigError(f"{rows.name} gives no {split} rows of data.seq_len={data_cfg.seq_len} tokens; "
                              "use more data, a shorter data.seq_len, or data.overlong=truncate")
    stats = [{"name": r.name, **r.stats(), "eod": r.corpus.eod} for r in packed]
    if split == "val" or len(packed) == 1:
        return SplitData(ConcatRows(packed, f"{split} split") if len(packed) > 1 else packed[0], stats)
    return SplitData(Blend(packed, [s.weight for s in sources]), stats)


def iter_batches_in_order(rows: Union[PackedRows, LazyRows], size: int, limit: Optional[int] = None
                          ) -> Iterator[dict[str, torch.Tensor]]:
    """Global batches of packed rows in order (up to `limit`), each gathered when reached. A short last batch
    is filled with empty rows (no labels, padding document ids), which add nothing to the loss or its token
    count."""
    n = -(-rows.num_rows // size) if limit is None else min(limit, -(-rows.num_rows // size))
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "document_ids": PAD_DOC, "sample_ids": PAD_DOC}
    for i in range(n):
        drawn = rows.gather(np.arange(i * size, min((i + 1) * size, rows.num_rows)))
        part = {k: torch.from_numpy(drawn[k]).long() for k in PackedRows.FIELDS}
        short = size - part["input_ids"].shape[0]
        if short:
            part = {k: torch.cat([v, v.new_full((short, v.shape[1]), fill[k])]) for k, v in part.items()}
        yield part


def batches_in_order(rows: Union[PackedRows, LazyRows], size: int, limit: int,
                     what: str) -> list[dict[str, torch.Tensor]]:
    """Up to `limit` global batches of packed rows, in order (validation): iter_batches_in_order's, listed."""
    if rows.num_rows == 0:
        raise ConfigError(f"{what} has no rows; use more validation data or trainer.eval_every=0")
    return list(iter_batches_in_order(rows, size, limit))
