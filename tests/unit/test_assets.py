"""The bundled corpus and tokenizer: present, loadable with plain transformers, and what the build script makes."""

from __future__ import annotations

import json
import re
import sys

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.assets import BUNDLED_TOKENIZER, BUNDLED_TRAIN, BUNDLED_VAL, asset_path
from trainer.assets import build_assets


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


def test_paths_point_inside_the_package():
    assert asset_path("corpus", "train.jsonl") == BUNDLED_TRAIN
    for p in (BUNDLED_TRAIN, BUNDLED_VAL, BUNDLED_TOKENIZER / "tokenizer.json", asset_path("corpus", "README.md"),
              asset_path("corpus", "LICENSE-PSF.txt")):
        assert p.is_file(), p


def test_corpus_is_real_text_split_about_95_5():
    train, val = _read(BUNDLED_TRAIN), _read(BUNDLED_VAL)
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in train + val)
    assert not {d["source"] for d in train} & {d["source"] for d in val}
    n_train = sum(len(d["text"].encode()) for d in train)
    n_val = sum(len(d["text"].encode()) for d in val)
    assert 500_000 <= n_train + n_val <= 1_500_000
    assert 0.03 <= n_val / (n_train + n_val) <= 0.08
    assert any("assignment statement" in d["text"].lower() for d in train + val)


def test_tokenizer_loads_with_special_tokens(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) <= 2048  # the tiny model's vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    ids = tok.convert_tokens_to_ids(build_assets.SPECIAL_TOKENS)
    assert len(set(ids)) == 5 and max(ids) < len(tok)
    # Special tokens are atomic, and plain text never produces them.
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == ids[3]
    assert not set(tok("im_start eos bos", add_special_tokens=False)["input_ids"]) & set(ids)


def test_chat_template_is_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == prompt


def test_decode_encode_round_trips_the_corpus(tok):
    texts = [d["text"] for d in _read(BUNDLED_VAL) + _read(BUNDLED_TRAIN)[::5]]
    texts.append("unicode: naïve café — 漢字 🙂\ttabs\r\nand  spaces ")
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
        assert tok.decode(ids) == text


def test_build_script_reproduces_committed_assets():
    # The corpus comes from the running CPython's docs, so only the recorded version can reproduce it.
    readme = asset_path("corpus", "README.md").read_text(encoding="utf-8")
    built_with = re.search(r"CPython (\S+)'s", readme).group(1)
    if built_with != sys.version.split()[0]:
        pytest.skip(f"assets were built with CPython {built_with}, this is {sys.version.split()[0]}")
    assert build_assets.main(["--check"]) == 0  # about 5 s on 2 cores
