"""Preference data (data.format=preference) and pair packing: TRL's row formats, completion-only labels, pair
truncation, pairs never split (odd counts, pairs longer than half a row), and packing that changes throughput,
not the loss (tests/integration/test_dpo_cli.py runs that)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from trainer.assets import BUNDLED_TOKENIZER
from trainer.config import DataConfig, DataSource
from trainer.data.corpus import TokenizedCorpus
from trainer.data.loader import GlobalBatchLoader
from trainer.data.preference import BadRow, fit_pair, load_preference_corpus, to_pair
from trainer.data.row_index import build_rows
from trainer.dpo import check_pairs
from trainer.errors import ConfigError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)


def _corpus(tok, tmp: Path, rows: list, **cfg) -> "TokenizedCorpus":
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    data = DataConfig(format="preference", **{"seq_len": 256, **cfg})
    return load_preference_corpus(DataSource(path=str(path), format="preference"), tok, data, tmp / "cache")


def _labelled(tok, corpus, doc: int) -> str:
    targets = corpus.doc_targets(doc)
    return tok.decode(corpus.doc(doc)[targets])


def test_the_three_row_forms_label_only_the_completions(tok, tmp_path):
    rows = [
        {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."},
        {"prompt": [U("Hi?")], "chosen": [A("Hello there.")], "rejected": [A("Go away.")]},
        {"chosen": [U("Name a loop."), A("for")], "rejected": [U("Name a loop."), A("if")]},
    ]
    c = _corpus(tok, tmp_path, rows)
    assert c.pairs and c.num_docs == 6
    # Standard rows: prompt + completion + EOS (TRL's add_eos); the EOS is trained on.
    assert tok.decode(c.doc(0)) == "The capital of France is Paris.<|eos|>"
    assert _labelled(tok, c, 0) == " Paris.<|eos|>" and _labelled(tok, c, 1) == " Rome.<|eos|>"
    # Conversational rows: the chat template's rendering; labels on the answer and its end-of-turn token.
    assert tok.decode(c.doc(2)).startswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert _labelled(tok, c, 2) == "Hello there.<|im_end|>" and _labelled(tok, c, 3) == "Go away.<|im_end|>"
    # Implicit prompt: the shared leading message is the prompt, so the user turn carries no label.
    assert _labelled(tok, c, 4) == "for<|im_end|>" and _labelled(tok, c, 5) == "if<|im_end|>"
    prompt_len = int(np.argmax(c.doc_targets(4)))
    assert np.array_equal(c.doc(4)[:prompt_len], c.doc(5)[:prompt_len])


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "chosen": "c"}, "no 'rejected' field"),
    ({"prompt": "p", "rejected": "r"}, "no 'chosen' field"),
    ({"chosen": [U("a"), A("b")], "rejected": [U("x"), A("y")]}, "share no leading message"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt' field"),
    ({"prompt": [U("q")], "chosen": [U("not an answer")], "rejected": [A("r")]}, "'chosen' has no assistant message"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' is int"),
])
def test_bad_rows_say_what_is_wrong(row, needle):
    with pytest.raises(BadRow, match=needle):
        to_pair(row)


def test_bad_rows_name_file_and_line_or_are_counted(tok, tmp_path):
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    rows = [good, {"prompt": "a", "chosen": "b"}, "{not json", good]
    with pytest.raises(ConfigError, match=r"pairs.jsonl:2: no 'rejected' field.*data.on_bad_row=skip"):
        _corpus(tok, tmp_path / "error", rows)
    c = _corpus(tok, tmp_path / "skip", rows, on_bad_row="skip")
    assert c.num_docs == 4 and sum(c.bad_rows.values()) == 2


def test_an_empty_completion_is_a_bad_row(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: the chosen completion is empty"):
        _corpus(tok, tmp_path, [{"prompt": [U("q")], "chosen": [A("")], "rejected": [A("r")]}])


def test_overlong_pairs_cut_the_prompt_from_the_left_then_the_longer_completion(tok, tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    row = {"prompt": long_prompt, "chosen": " yes " * 30, "rejected": " no"}
    full = _corpus(tok, tmp_path / "full", [row], seq_len=1024)
    cut = _corpus(tok, tmp_path / "cut", [row], seq_len=48)
    assert cut.truncated == 1 and len(cut.doc(0)) + len(cut.doc(1)) - 2 <= 48
    # Both documents lost the same leading prompt tokens, and keep one prompt token at least.
    k = len(full.doc(1)) - len(cut.doc(1))
    assert k > 0 and np.array_equal(cut.doc(1), full.doc(1)[k:])
    assert np.array_equal(cut.doc(0), full.doc(0)[k:k + len(cut.doc(0))])  # then the chosen (longer) from the right
    assert not cut.doc_targets(0)[0] and cut.doc_targets(0)[1:].any()
    dropped = _corpus(tok, tmp_path / "drop", [row, {"prompt": "a", "chosen": " b", "rejected": " c"}], seq_len=48,
                      overlong="drop")
    assert dropped.dropped == 1 and dropped.num_docs == 2
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: the pair needs \d+ slots .* data.seq_len=48"):
        _corpus(tok, tmp_path / "err", [row], seq_len=48, overlong="error")
    # Even a prompt that alone would fill the row leaves each completion a token to train on: the prompt goes
    # down to one token before a completion is cut, and the completions are cut evenly.
    tight = _corpus(tok, tmp_path / "tight", [{"prompt": long_prompt, "chosen": " yes " * 30,
                                                "rejected": " no" * 40}], seq_len=8)
    assert len(tight.doc(0)) + len(tight.doc(1)) - 2 <= 8
    assert tight.doc_targets(0)[1:].any() and tight.doc_targets(1)[1:].any()


def test_fit_pair_keeps_one_prompt_token_and_balances_the_completions():
    targets = lambda n, p: np.arange(n) >= p  # noqa: E731
    c, r = np.arange(30), np.arange(12)
    sc, sr, cut = fit_pair(c, r, targets(30, 10), targets(12, 10), 20)
    assert cut and sc.start == sr.start == 9  # the 10-token prompt cut to 1
    a, b = sc.stop - sc.start, sr.stop - sr.start
    assert a + b - 2 <= 20 and b == 3 and a == 19  # the rejected kept whole, the chosen cut from the right


def _pair_corpus(sizes: list[tuple[int, int]]) -> TokenizedCorpus:
    lengths = [n for pair in sizes for n in pair]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.uint32) % 50
    targets = np.ones(offsets[-1], bool)
    return TokenizedCorpus("pairs", tokens, offsets, targets, pairs=True)


@pytest.mark.parametrize("packing", [True, False])
def test_no_pair_is_ever_split(packing):
    rng = np.random.default_rng(0)
    S = 64
    # 37 pairs (odd), many longer than half a row, some filling it exactly.
    chosen = rng.integers(2, 50, size=35)
    sizes = [(int(a), int(rng.integers(2, S + 3 - a))) for a in chosen] + [(33, 33), (2, 64)]
    corpus = _pair_corpus(sizes)
    rows = build_rows(corpus, S, None, packing=packing)
    got = rows.gather(np.arange(rows.num_rows))
    seen = set()
    for r in range(rows.num_rows):
        sample = got["sample_ids"][r]
        ids = [int(s) for s in dict.fromkeys(sample[sample >= 0])]  # in order of appearance
        assert len(ids) % 2 == 0
        for chosen, rejected in zip(ids[0::2], ids[1::2]):
            assert chosen % 2 == 0 and rejected == chosen + 1  # the rejected right after its chosen
        seen.update(ids)
        check_pairs(np.unique(sample[sample >= 0]))
    assert seen == set(range(2 * len(sizes)))
    # Rows are what the loader, data-parallel ranks and micro-batches split: any split of rows keeps pairs whole.
    loader = GlobalBatchLoader(rows, 4, seed=0, prefetch=0)
    for _ in range(5):
        batch = next(loader)
        for part in batch["sample_ids"].split(1):
            ids = part[part >= 0].numpy()
            check_pairs(np.unique(ids))
    loader.close()


def test_check_pairs_refuses_a_split_pair():
    check_pairs(np.array([4, 5, 10, 11]))
    with pytest.raises(RuntimeError, match="part of a preference pair"):
        check_pairs(np.array([4, 5, 11]))
    with pytest.raises(RuntimeError, match="part of a preference pair"):
        check_pairs(np.array([5, 6]))


def test_parquet_and_hf_disk_rows_give_the_jsonl_tokens(tok, tmp_path):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [U(f"Question {i}?")], "chosen": [A(f"Answer {i}.")], "rejected": [A("No.")]} for i in range(5)]
    ref = _corpus(tok, tmp_path / "jsonl", rows)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "pairs.parquet", row_group_size=2)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    data = DataConfig(format="preference", seq_len=256)
    for path in (tmp_path / "pq" / "pairs.parquet", tmp_path / "disk"):
        got = load_preference_corpus(DataSource(path=str(path), format="preference"), tok, data, tmp_path / "cache")
        assert np.array_equal(np.asarray(got.tokens), np.asarray(ref.tokens)), path
        assert np.array_equal(got.offsets, ref.offsets) and np.array_equal(got.targets, ref.targets)
    # A record without "rejected" (Parquet fills the column with null) is named by file and row.
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": " c", "rejected": " r"}, {"prompt": "p", "chosen": " c"}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=r"bad.parquet: row 1: 'rejected' is NoneType"):
        load_preference_corpus(DataSource(path=str(tmp_path / "bad.parquet"), format="preference"), tok, data,
                               tmp_path / "cache")


def test_the_bundled_preference_set_is_what_its_generator_writes():
    from trainer.assets import build_preference

    assert build_preference.main(["--check"]) == 0
