"""Chat SFT data: formats, exact assistant target masks from rendered character offsets, bad rows, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from trainer.assets import BUNDLED_TOKENIZER, build_sft_chat
from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import sft
from trainer.data.sft import BUNDLED_SFT_TRAIN, BUNDLED_SFT_VAL, load_sft_corpus, to_messages

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(tok, path, fmt="messages", cache=None, **data):
    cfg = DataConfig(format=fmt, **data)
    return load_sft_corpus(DataSource(path=str(path), format=fmt), tok, cfg, cache)


def _runs(mask):
    """[start, stop) of each maximal run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _assert_exact(tok, corpus, conversations, last_only=False):
    """Each conversation's targets are exactly its assistant contents, each followed by <|im_end|>."""
    assert corpus.num_docs == len(conversations)
    for i, messages in enumerate(conversations):
        ids, mask = np.asarray(corpus.doc(i)), np.asarray(corpus.doc_targets(i))
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if last_only:
            answers = answers[-1:]
        decoded = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
        assert decoded == [a + IM_END for a in answers], f"conversation {i}"
        # The whole conversation is there, and nothing but assistant turns is a target.
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(ids[~mask]).count("<|im_start|>") == len(messages)


def test_bundled_set_masks_are_exact_for_every_turn(tok, tmp_path):
    for path in (BUNDLED_SFT_TRAIN, BUNDLED_SFT_VAL):
        conversations = [r["messages"] for r in _rows(path)]
        _assert_exact(tok, _load(tok, path, cache=tmp_path), conversations)


def test_last_assistant_marks_only_the_final_turn(tok, tmp_path):
    conversations = [r["messages"] for r in _rows(BUNDLED_SFT_VAL)]
    assert any(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)
    corpus = _load(tok, BUNDLED_SFT_VAL, cache=tmp_path, train_on="last_assistant")
    _assert_exact(tok, corpus, conversations, last_only=True)


def test_sharegpt_and_alpaca_rows(tok, tmp_path):
    share = _write(tmp_path / "share.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is a tuple?"},
        {"from": "gpt", "value": "An immutable sequence."}, {"from": "user", "value": "Example?"},
        {"from": "assistant", "value": "(1, 2, 3)"}]}])
    corpus = _load(tok, share, "sharegpt", tmp_path / "c")
    expect = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"},
              {"role": "assistant", "content": "An immutable sequence."}, {"role": "user", "content": "Example?"},
              {"role": "assistant", "content": "(1, 2, 3)"}]
    _assert_exact(tok, corpus, [expect])

    alpaca = _write(tmp_path / "alpaca.jsonl", [
        {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"},
        {"instruction": "Name a Python keyword.", "input": "", "output": "lambda"},
        {"instruction": "Say hi.", "output": " Hi there!\n"}])
    corpus = _load(tok, alpaca, "alpaca", tmp_path / "c")
    _assert_exact(tok, corpus, [
        [{"role": "user", "content": "Reverse the list.\n\n[1, 2, 3]"}, {"role": "assistant", "content": "[3, 2, 1]"}],
        [{"role": "user", "content": "Name a Python keyword."}, {"role": "assistant", "content": "lambda"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": " Hi there!\n"}]])


def test_token_straddling_the_content_start_is_a_target(tok, tmp_path):
    # "assistant\n" + "\n  x" merges "\n\n " into one BPE token across the boundary: the model must emit it.
    path = _write(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "\n  x = 1"}]}])
    corpus = _load(tok, path, cache=tmp_path)
    ids, mask = np.asarray(corpus.doc(0)), np.asarray(corpus.doc_targets(0))
    [(a, b)] = _runs(mask)
    assert tok.decode(ids[a:b]) == "\n\n  x = 1" + IM_END  # one "\n" belongs to the role header
    assert tok.decode(ids[:a]).endswith("<|im_start|>assistant")


@pytest.mark.parametrize("fmt,row,problem", [
    ("messages", "{not json", "invalid JSON"),
    ("messages", {"text": "hi"}, "no 'messages' field"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, "'tool'"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "int"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}, "'bot'"),
    ("alpaca", {"instruction": "hi"}, "'output'"),
    ("alpaca", {"instruction": "hi", "input": 1, "output": "x"}, "'input'"),
])
def test_bad_rows_error_with_file_and_line_or_are_skipped_and_counted(tok, tmp_path, fmt, row, problem):
    good = {"messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            "alpaca": {"instruction": "hi", "output": "hello"}}[fmt]
    path = _write(tmp_path / "d.jsonl", [good, row, good])
    with pytest.raises(ConfigError, match=rf"d\.jsonl:2: .*{problem}") as err:
        _load(tok, path, fmt, tmp_path / "c")
    assert "on_bad_row" in str(err.value)
    corpus = _load(tok, path, fmt, tmp_path / "c", on_bad_row="skip")
    assert corpus.num_docs == 2 and corpus.bad_rows == {str(path): 1}
    again = _load(tok, path, fmt, tmp_path / "c", on_bad_row="skip")  # from the cache, counts included
    assert again.bad_rows == {str(path): 1}


def test_cache_is_reused_and_keyed_by_train_on_and_template(tok, tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    first = _load(tok, path, cache=tmp_path / "c")
    calls = []
    real = sft.tokenize_chat_part
    monkeypatch.setattr(sft, "tokenize_chat_part", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _load(tok, path, cache=tmp_path / "c")
    assert not calls and np.array_equal(first.targets, again.targets) and np.array_equal(first.tokens, again.tokens)
    last = _load(tok, path, cache=tmp_path / "c", train_on="last_assistant")
    assert len(calls) == 1 and last.targets.sum() < first.targets.sum()
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    plain = _load(tok, path, cache=tmp_path / "c", chat_template=str(jinja))
    assert len(calls) == 2
    # No special token follows a turn in this template: only the contents are targets.
    # (" b" is one BPE token overlapping the content "b", so it is a target, leading space and all.)
    assert [tok.decode(plain.tokens[a:b]) for a, b in _runs(np.asarray(plain.targets))] == [" b", " d"]
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "c").iterdir()) == \
        sorted(["bin", "idx", "targets.bin", "targets.idx", "meta.json"] * 3)


def test_templates_that_rewrite_contents_are_refused(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": " b "}]}])
    jinja = tmp_path / "strip.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] | trim }}<|im_end|>{% endfor %}", encoding="utf-8")
    with pytest.raises(ConfigError, match="changes assistant contents"):
        _load(tok, path, cache=tmp_path, chat_template=str(jinja))
    with pytest.raises(ConfigError, match="chat_template"):
        _load(tok, path, cache=tmp_path, chat_template=str(tmp_path / "missing.jinja"))


def test_to_messages_normalises_every_format():
    assert to_messages({"instruction": "i", "input": None, "output": "o"}, "alpaca") == [
        {"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}]
    assert to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                       "sharegpt") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_bundled_set_is_varied_small_and_reproducible(tok):
    train, val = _rows(BUNDLED_SFT_TRAIN), _rows(BUNDLED_SFT_VAL)
    assert (len(train), len(val)) == (400, 40)
    assert BUNDLED_SFT_TRAIN.stat().st_size + BUNDLED_SFT_VAL.stat().st_size < 1_500_000
    turns = {sum(m["role"] == "assistant" for m in r["messages"]) for r in train}
    assert turns == {1, 2, 3, 4}
    assert 0.2 < np.mean([r["messages"][0]["role"] == "system" for r in train]) < 0.5
    lengths = [len(ids) for ids in tok([tok.apply_chat_template(r["messages"], tokenize=False) for r in train],
                                       add_special_tokens=False)["input_ids"]]
    assert min(lengths) < 64 and sum(n > 256 for n in lengths) >= 20
    assert build_sft_chat.main(["--check"]) == 0
