"""Pretraining data path: tokenizer choice, document reading, the token cache, rows, splits and the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from trainer.assets import BUNDLED_TOKENIZER, BUNDLED_VAL
from trainer.config import ConfigError, DataConfig
from trainer.data import pretrain
from trainer.data.pretrain import (RowLoader, build_token_rows, default_cache_dir, has_val_split, iter_batches,
                                   join_with_eos)
from trainer.data.tokenizer import check_vocab_fits, load_tokenizer

DOCS = [f"Document number {i} talks about {'lists and tuples' if i % 2 else 'the import system'}.\n"
        f"  It has an indented second line, {i * 7} words." for i in range(20)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DataConfig(), None)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def expected_stream(tok, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def rows(tok, cache, split="train", **kw) -> torch.Tensor:
    return build_token_rows(DataConfig(**kw), tok, split, cache)


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = pretrain._encode_batch

    def counting(tokenizer, texts):
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(pretrain, "_encode_batch", counting)
    return calls


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_resolution_order(tmp_path, tok):
    assert len(tok) <= 2048 and tok.eos_token == "<|eos|>"
    own = tmp_path / "own"
    tok.save_pretrained(str(own))
    weights_only = tmp_path / "ckpt"
    weights_only.mkdir()
    # data.tokenizer wins; a checkpoint with tokenizer files is next; without them, the bundled one.
    assert load_tokenizer(DataConfig(tokenizer=str(own)), str(weights_only)).name_or_path == str(own)
    assert load_tokenizer(DataConfig(), str(own)).name_or_path == str(own)
    assert load_tokenizer(DataConfig(), str(weights_only)).name_or_path == str(BUNDLED_TOKENIZER)


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer=.*nowhere.*does not exist"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nowhere")), None)
    with pytest.raises(ConfigError, match="not an HF tokenizer directory.*tokenizer.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)), None)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(ConfigError, match=f"could not load the tokenizer in {tmp_path}"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)), None)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]").save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="no EOS token"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)), None)


def test_vocab_must_fit_the_model(tok):
    check_vocab_fits(tok, 2048)
    with pytest.raises(ConfigError, match="model.vocab_size=1000"):
        check_vocab_fits(tok, 1000)


# ------------------------------------------------------------------------------------- rows, formats


def test_rows_are_eos_joined_documents_cut_without_overlap(tmp_path, tok, cache):
    path = write_text(tmp_path / "c.txt", DOCS)
    r = rows(tok, cache, path=str(path), val_fraction=0.0, seq_len=15)
    stream = expected_stream(tok, DOCS)
    assert r.dtype == torch.long and r.shape == (len(stream) // 16, 16)
    assert r.flatten().tolist() == stream[: r.numel()]  # tail dropped, nothing repeated
    assert (r == tok.eos_token_id).sum() == sum(1 for t in stream[: r.numel()] if t == tok.eos_token_id)
    batch = next(iter_batches(r, 4))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 15)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["labels"], r[:4, 1:])


def test_text_and_jsonl_formats_agree(tmp_path, tok, cache):
    txt = rows(tok, cache, path=str(write_text(tmp_path / "c.txt", DOCS)), val_fraction=0.0, seq_len=15)
    jsonl = rows(tok, cache, path=str(write_jsonl(tmp_path / "c.jsonl", DOCS, "body")), format="jsonl_text",
                 text_field="body", val_fraction=0.0, seq_len=15)
    assert torch.equal(txt, jsonl)


def test_text_blocks_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\n  indented\n\n \t \n\n\ntwo\nlines\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("three", encoding="utf-8")
    (tmp_path / "skip.jsonl").write_text("{}", encoding="utf-8")
    files = pretrain.resolve_files(str(tmp_path), "text", "data.path")
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    docs = list(pretrain.iter_documents(pretrain.Source("t", files, "text", "text")))
    assert docs == ["one\n  indented", "two\nlines", "three"]
    assert pretrain.resolve_files(str(tmp_path / "*.txt"), "text", "data.path") == files


def test_directory_of_jsonl_files_in_sorted_order(tmp_path, tok, cache):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "b.jsonl", DOCS[10:])
    write_jsonl(tmp_path / "d" / "a.jsonl", DOCS[:10])
    r = rows(tok, cache, path=str(tmp_path / "d"), format="jsonl_text", val_fraction=0.0, seq_len=15)
    assert r.flatten().tolist() == expected_stream(tok, DOCS)[: r.numel()]


def test_bad_json_and_missing_field_name_file_and_line(tmp_path, tok, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}:3: invalid JSON"):
        rows(tok, cache, path=str(path), format="jsonl_text")
    path.write_text('{"text": "fine"}\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}:2: no 'text' field.*content"):
        rows(tok, cache, path=str(path), format="jsonl_text")
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}:1: field 'text' is int"):
        rows(tok, cache, path=str(path), format="jsonl_text")


def test_missing_or_empty_paths_are_config_errors(tmp_path, tok, cache):
    with pytest.raises(ConfigError, match="data.path=.*nope.*does not exist"):
        rows(tok, cache, path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no .txt files"):
        rows(tok, cache, path=str(tmp_path))


# ------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_tokenization_and_file_change_invalidates(tmp_path, tok, cache, count_encodes):
    path = write_text(tmp_path / "c.txt", DOCS)
    first = rows(tok, cache, path=str(path), seq_len=15)
    assert count_encodes and sum(count_encodes) == len(DOCS)
    count_encodes.clear()
    assert torch.equal(rows(tok, cache, path=str(path), seq_len=15), first)
    rows(tok, cache, "val", path=str(path), seq_len=7)
    assert count_encodes == []  # train, val and another seq_len all reuse the one cached tokenization
    assert not list(cache.glob("*.tmp"))

    write_text(path, ["A changed first document."] + DOCS[1:])
    changed = rows(tok, cache, path=str(path), seq_len=15)
    assert sum(count_encodes) == len(DOCS) and not torch.equal(changed, first)


def test_corrupt_cache_entry_is_rebuilt(tmp_path, tok, cache, count_encodes):
    path = write_text(tmp_path / "c.txt", DOCS)
    first = rows(tok, cache, path=str(path), seq_len=15)
    (offsets,) = cache.glob("*.offsets.npy")
    np.save(offsets, np.array([0, 1], dtype=np.int64))  # no longer matches the tokens file
    count_encodes.clear()
    assert torch.equal(rows(tok, cache, path=str(path), seq_len=15), first)
    assert count_encodes


def test_default_cache_dir(tmp_path, monkeypatch):
    assert default_cache_dir(DataConfig(cache_dir=str(tmp_path))) == tmp_path / "tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(DataConfig()) == tmp_path / "xdg" / "meshtron" / "tokens"


# ------------------------------------------------------------------------------------------- splits


def test_bundled_corpus_train_and_val(tok, cache):
    train, val = rows(tok, cache), rows(tok, cache, "val")
    assert train.shape[1] == val.shape[1] == 257 and len(train) > 10 * len(val) > 0
    # path=None means the bundled val.jsonl, whatever val_fraction says.
    same = rows(tok, cache, path=str(BUNDLED_VAL), format="jsonl_text", val_fraction=0.0)
    assert torch.equal(val, same)


def test_val_path_is_used_whole(tmp_path, tok, cache):
    train_path = write_text(tmp_path / "train.txt", DOCS[:15])
    val_path = write_text(tmp_path / "val.txt", DOCS[15:])
    kw = dict(path=str(train_path), val_path=str(val_path), seq_len=7)  # val_fraction is not used
    train, val = rows(tok, cache, **kw), rows(tok, cache, "val", **kw)
    assert train.flatten().tolist() == expected_stream(tok, DOCS[:15])[: train.numel()]
    assert val.flatten().tolist() == expected_stream(tok, DOCS[15:])[: val.numel()]


def test_last_val_fraction_of_documents_is_held_out(tmp_path, tok, cache):
    path = write_text(tmp_path / "c.txt", DOCS)
    kw = dict(path=str(path), val_fraction=0.1, seq_len=7)
    train, val = rows(tok, cache, **kw), rows(tok, cache, "val", **kw)
    assert train.flatten().tolist() == expected_stream(tok, DOCS[:18])[: train.numel()]
    assert val.flatten().tolist() == expected_stream(tok, DOCS[18:])[: val.numel()]


def test_no_val_split_when_fraction_is_zero(tmp_path, tok, cache):
    cfg = DataConfig(path=str(write_text(tmp_path / "c.txt", DOCS)), val_fraction=0.0)
    assert not has_val_split(cfg) and has_val_split(DataConfig())
    with pytest.raises(ConfigError, match="no validation split"):
        build_token_rows(cfg, tok, "val", cache)
    one_doc = DataConfig(path=str(write_text(tmp_path / "one.txt", DOCS[:1])), val_fraction=0.1)
    with pytest.raises(ConfigError, match="1 document.*leaves none for training"):
        build_token_rows(one_doc, tok, "train", cache)


def test_too_little_data_names_corpus_tokens_and_sizes(tmp_path, tok, cache):
    path = write_text(tmp_path / "tiny.txt", DOCS[:2])
    with pytest.raises(ConfigError, match=r"tiny.txt.*has \d+ tokens.*seq_len\+1=1025"):
        rows(tok, cache, path=str(path), val_fraction=0.0, seq_len=1024)
    r = rows(tok, cache, path=str(path), val_fraction=0.0, seq_len=15)
    with pytest.raises(ConfigError, match=rf"{len(r)} rows of data.seq_len\+1=16 tokens .* batch of 64"):
        RowLoader(r, 64, seed=0)


# ------------------------------------------------------------------------------------------- loader


def _take(loader, n):
    return [next(loader)["input_ids"] for _ in range(n)]


def numbered_rows(n=10, width=5):
    return torch.arange(n * width).reshape(n, width)


def test_loader_is_deterministic_per_seed_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    a, b = _take(RowLoader(numbered_rows(), 3, seed=7), 8), _take(RowLoader(numbered_rows(), 3, seed=7), 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _take(RowLoader(numbered_rows(), 3, seed=8), 8)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert torch.equal(torch.get_rng_state(), rng)


def test_loader_epochs_visit_rows_once_and_reshuffle():
    loader = RowLoader(numbered_rows(), 3, seed=0)
    assert (loader.rows_per_epoch, loader.batches_per_epoch) == (9, 3)
    first_rows = [int(r[0]) // 5 for b in _take(loader, 3) for r in b]
    assert len(set(first_rows)) == 9 and loader.epoch == 0
    second_rows = [int(r[0]) // 5 for b in _take(loader, 3) for r in b]
    assert loader.epoch == 1 and len(set(second_rows)) == 9 and first_rows != second_rows
    ordered = RowLoader(numbered_rows(), 3, seed=0, shuffle=False)
    assert [int(r[0]) // 5 for b in _take(ordered, 4) for r in b] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]


def test_state_dict_resume_continues_exactly():
    full = RowLoader(numbered_rows(), 3, seed=3)
    reference = _take(full, 10)
    partial = RowLoader(numbered_rows(), 3, seed=3)
    _take(partial, 4)  # into the second epoch
    state = json.loads(json.dumps(partial.state_dict()))  # must survive a plain-data round trip
    resumed = RowLoader(numbered_rows(), 3, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(_take(resumed, 6), reference[4:]))
    with pytest.raises(ConfigError, match="10 rows but this run's corpus gives 9"):
        RowLoader(numbered_rows(9), 3, seed=3).load_state_dict(state)


def test_iter_batches_in_order_with_partial_last_batch():
    r = numbered_rows(7)
    sizes = [len(b["input_ids"]) for b in iter_batches(r, 3)]
    assert sizes == [3, 3, 1]
    assert [len(b["input_ids"]) for b in iter_batches(r, 3, max_batches=2)] == [3, 3]
    assert torch.equal(torch.cat([b["labels"] for b in iter_batches(r, 3)]), r[:, 1:])


def test_join_with_eos_on_a_document_range():
    corpus = pretrain.TokenizedCorpus("c", np.array([5, 6, 7, 8, 9], dtype=np.uint32), np.array([0, 2, 2, 5]))
    assert join_with_eos(corpus, 0, 3, 1).tolist() == [5, 6, 1, 1, 7, 8, 9, 1]
    assert join_with_eos(corpus, 1, 3, 0).tolist() == [0, 7, 8, 9, 0]
