"""Pretraining data path: tokenizer choice, document reading, the token cache and the split rules, checked
through build_split (sources -> TokenizedCorpus -> packed rows). Packing itself: test_packing.py; the loader's
order and resume: test_loader.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from trainer.assets import BUNDLED_TOKENIZER, BUNDLED_VAL
from trainer.config import Config, DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import pretrain, sources
from trainer.data.build import batches_in_order, build_split
from trainer.data.packing import IGNORE_INDEX, PAD_DOC, PackedRows
from trainer.data.build import has_val_split
from trainer.data.pretrain import default_cache_dir, held_out_count
from trainer.data.tokenizer import check_vocab_fits, load_tokenizer
from trainer.loop import prepare

DOCS = [f"Document number {i} talks about {'lists and tuples' if i % 2 else 'the import system'}.\n"
        f"  It has an indented second line, {i * 7} words." for i in range(20)]


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def expected_inputs(tok, docs: list[str]) -> list[int]:
    """Packed inputs: every document's tokens back to back (its EOS is only ever a label)."""
    return [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"]]


def expected_labels(tok, docs: list[str]) -> list[int]:
    """Packed labels: each document's next tokens, then EOS where the document ends."""
    return [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"][1:] + [tok.eos_token_id]]


def rows(tok, cache, split="train", **kw) -> PackedRows:
    return build_split(DataConfig(**kw), tok, split, cache).rows


def assert_holds(r: PackedRows, tok, docs: list[str]) -> None:
    """The rows are exactly the documents' slots in order, the incomplete last row dropped."""
    n = r.input_ids.size
    assert r.input_ids.flatten().tolist() == expected_inputs(tok, docs)[:n]
    assert r.labels.flatten().tolist() == expected_labels(tok, docs)[:n]


def same_rows(a: PackedRows, b: PackedRows) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in PackedRows.FIELDS)


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
    with pytest.raises(ConfigError, match=f"{tmp_path / 'tokenizer.json'}: not valid JSON.*copy or download"):
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


def test_rows_are_eos_terminated_documents_cut_without_overlap(tmp_path, tok, cache):
    path = write_text(tmp_path / "c.txt", DOCS)
    r = rows(tok, cache, path=str(path), val_fraction=0.0, seq_len=15)
    n_slots = len(expected_inputs(tok, DOCS))
    assert r.input_ids.shape == (n_slots // 15, 15)  # tail dropped, nothing repeated
    assert_holds(r, tok, DOCS)
    n_eos = sum(1 for t in expected_labels(tok, DOCS)[: r.labels.size] if t == tok.eos_token_id)
    assert (r.labels == tok.eos_token_id).sum() == n_eos > 0


def test_text_and_jsonl_formats_agree(tmp_path, tok, cache):
    txt = rows(tok, cache, path=str(write_text(tmp_path / "c.txt", DOCS)), val_fraction=0.0, seq_len=15)
    jsonl = rows(tok, cache, path=str(write_jsonl(tmp_path / "c.jsonl", DOCS, "body")), format="jsonl_text",
                 text_field="body", val_fraction=0.0, seq_len=15)
    assert same_rows(txt, jsonl)


def test_text_blocks_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\n  indented\n\n \t \n\n\ntwo\nlines\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("three", encoding="utf-8")
    (tmp_path / "skip.jsonl").write_text("{}", encoding="utf-8")
    files = sources.resolve_files(str(tmp_path), "text", "data.path")
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    docs = list(sources.iter_documents(sources.Source("t", files, "text", "text")))
    assert docs == ["one\n  indented", "two\nlines", "three"]
    assert sources.resolve_files(str(tmp_path / "*.txt"), "text", "data.path") == files


def test_directory_of_jsonl_files_in_sorted_order(tmp_path, tok, cache):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "b.jsonl", DOCS[10:])
    write_jsonl(tmp_path / "d" / "a.jsonl", DOCS[:10])
    assert_holds(rows(tok, cache, path=str(tmp_path / "d"), format="jsonl_text", val_fraction=0.0, seq_len=15),
                 tok, DOCS)


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
    assert same_rows(rows(tok, cache, path=str(path), seq_len=15), first)
    rows(tok, cache, "val", path=str(path), seq_len=7)
    assert count_encodes == []  # train, val and another seq_len all reuse the one cached tokenization
    assert not list(cache.glob("*.tmp"))

    write_text(path, ["A changed first document."] + DOCS[1:])
    changed = rows(tok, cache, path=str(path), seq_len=15)
    assert sum(count_encodes) == len(DOCS) and not same_rows(changed, first)


def test_corrupt_cache_entry_is_rebuilt(tmp_path, tok, cache, count_encodes):
    path = write_text(tmp_path / "c.txt", DOCS)
    first = rows(tok, cache, path=str(path), seq_len=15)
    (tokens,) = cache.glob("*.bin")
    tokens.write_bytes(tokens.read_bytes()[:-2])  # shorter than its .idx says: rebuilt, not misread
    count_encodes.clear()
    assert same_rows(rows(tok, cache, path=str(path), seq_len=15), first)
    assert count_encodes


def test_default_cache_dir(tmp_path, monkeypatch):
    assert default_cache_dir(DataConfig(cache_dir=str(tmp_path))) == tmp_path / "tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(DataConfig()) == tmp_path / "xdg" / "meshtron" / "tokens"


# ------------------------------------------------------------------------------------------- splits


def test_bundled_corpus_train_and_val(tok, cache):
    train, val = rows(tok, cache), rows(tok, cache, "val")
    assert train.seq_len == val.seq_len == 256 and train.num_rows > 10 * val.num_rows > 0
    # path=None means the bundled val.jsonl, whatever val_fraction says.
    same = rows(tok, cache, path=str(BUNDLED_VAL), format="jsonl_text", val_fraction=0.0)
    assert np.array_equal(val.input_ids, same.input_ids) and np.array_equal(val.labels, same.labels)


def test_val_path_is_used_whole(tmp_path, tok, cache):
    train_path = write_text(tmp_path / "train.txt", DOCS[:15])
    val_path = write_text(tmp_path / "val.txt", DOCS[15:])
    kw = dict(path=str(train_path), val_path=str(val_path), seq_len=7)  # val_fraction is not used
    assert_holds(rows(tok, cache, **kw), tok, DOCS[:15])
    assert_holds(rows(tok, cache, "val", **kw), tok, DOCS[15:])


def test_last_val_fraction_of_documents_is_held_out(tmp_path, tok, cache):
    path = write_text(tmp_path / "c.txt", DOCS)
    kw = dict(path=str(path), val_fraction=0.1, seq_len=7)
    assert held_out_count(len(DOCS), DataConfig(**kw), "c") == 2
    assert_holds(rows(tok, cache, **kw), tok, DOCS[:18])
    assert_holds(rows(tok, cache, "val", **kw), tok, DOCS[18:])


def test_no_val_split_when_fraction_is_zero(tmp_path, tok, cache):
    cfg = DataConfig(path=str(write_text(tmp_path / "c.txt", DOCS)), val_fraction=0.0)
    assert not has_val_split(cfg) and has_val_split(DataConfig())
    with pytest.raises(ConfigError, match="needs a validation split.*data.val_fraction=0.0"):
        prepare(Config(data=cfg), world_size=1)  # evaluation is on by default: refused before any data is read
    with pytest.raises(ConfigError, match="no validation split: data.val_fraction=0"):
        build_split(cfg, tok, "val", cache)
    blended = DataConfig(sources=[DataSource(path=str(tmp_path / "c.txt"), format="text")], val_fraction=0.0)
    assert not has_val_split(blended)  # data.path unset, but these sources have no validation files
    one_doc = DataConfig(path=str(write_text(tmp_path / "one.txt", DOCS[:1])), val_fraction=0.1)
    with pytest.raises(ConfigError, match="1 document.*leaves none for training"):
        build_split(one_doc, tok, "train", cache)
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = DataConfig(path=str(tmp_path / "empty.txt"), val_fraction=0.1)
    with pytest.raises(ConfigError, match=r"holds no documents \(empty files, or every row blank or skipped\): check "
                                          r"data.path and data.format") as err:
        build_split(empty, tok, "train", cache)
    assert "val_path" not in str(err.value)  # a validation file would not help an empty training file


def test_too_little_data_names_corpus_and_seq_len(tmp_path, tok, cache):
    path = write_text(tmp_path / "tiny.txt", DOCS[:2])
    with pytest.raises(ConfigError, match=r"tiny.txt.*gives no train rows of data.seq_len=1024"):
        rows(tok, cache, path=str(path), val_fraction=0.0, seq_len=1024)


def test_validation_batches_in_order_with_a_padded_last_batch(tmp_path, tok, cache):
    r = rows(tok, cache, path=str(write_text(tmp_path / "c.txt", DOCS)), val_fraction=0.0, seq_len=15)
    assert r.num_rows % 4  # so the last batch is short
    batches = batches_in_order(r, 4, limit=100, what="val")
    assert len(batches) == -(-r.num_rows // 4) and all(b["input_ids"].shape == (4, 15) for b in batches)
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(labels[: r.num_rows], torch.from_numpy(r.labels).long())
    assert (labels[r.num_rows:] == IGNORE_INDEX).all()  # the fill adds nothing to the loss
    assert (torch.cat([b["document_ids"] for b in batches])[r.num_rows:] == PAD_DOC).all()
    assert len(batches_in_order(r, 4, limit=2, what="val")) == 2
