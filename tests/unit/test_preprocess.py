"""python -m trainer.data.preprocess: the same documents as the trainer's own tokenization, whatever the number
of workers; Megatron-readable output; resume; one-line errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import DataConfig, DataSource
from trainer.data import pretrain, preprocess, shared
from trainer.data.megatron_indexed import read_megatron
from trainer.data.sft import BUNDLED_SFT_TRAIN, load_sft_corpus
from trainer.data.sources import Part, read_lines

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

WORDS = "the index maps rows to runs of documents while ranks share parts of a large file".split()


@pytest.fixture(autouse=True)
def tiny_parts(monkeypatch):
    """Split even these tiny files, so several workers really share one file."""
    monkeypatch.setattr(shared, "MIN_PART_BYTES", 1)


def docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + f" #{i}" for i in range(n)]


def run(tmp_path, name, inputs, fmt, *extra, workers=1) -> Path:
    prefix = tmp_path / name
    argv = [a for i in inputs for a in ("--input", str(i))] + ["--format", fmt, "--output-prefix", str(prefix),
                                                               "--workers", str(workers), *extra]
    assert preprocess.main(argv) == 0
    assert not Path(f"{prefix}.parts").exists()
    return prefix


def as_lists(corpus) -> list[list[int]]:
    return [corpus.doc(i).tolist() for i in range(corpus.num_docs)]


def assert_megatron_core_reads(prefix: Path, expected: list[list[int]]) -> None:
    ds = indexed.IndexedDataset(str(prefix), mmap=True)
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def trainer_docs(tok, tmp_path, path, fmt, field="text") -> list[list[int]]:
    corpus = pretrain.load_source_corpus(DataSource(path=str(path), format=fmt, text_field=field), tok,
                                         DataConfig(), tmp_path / "trainer-cache")
    return as_lists(corpus)


def test_jsonl_workers_agree_with_the_trainer_and_megatron_core(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(300)) + "\n  \n")
    (tmp_path / "d" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(7, 1)))
    expected = trainer_docs(tok, tmp_path, tmp_path / "d", "jsonl_text")
    for workers in (1, 2, 3):
        prefix = run(tmp_path, f"w{workers}", [tmp_path / "d"], "jsonl_text", workers=workers)
        assert as_lists(read_megatron(prefix)) == expected, workers
    assert_megatron_core_reads(tmp_path / "w3", expected)
    assert trainer_docs(tok, tmp_path, tmp_path / "w3", "megatron") == expected  # data.format=megatron


def test_text_blocks_and_universal_newlines_survive_splitting(tmp_path, tok):
    blocks = [d.replace(" of ", "\n  of ") for d in docs(120, 2)]
    raw = "\n\n".join(blocks[:40]) + "\r\n\r\n" + "\r\n \t\r\n".join(blocks[40:80]) + "\n\n\n" + \
          "\r\r".join(blocks[80:]) + "\n"
    path = tmp_path / "c.txt"
    path.write_bytes(raw.encode())
    with open(path, encoding="utf-8") as f:  # what text mode reads: the reference for our binary reader
        text = f.read()
    blocks_read = [b.strip("\n") for b in text.replace("\n \t\n", "\n\n").split("\n\n") if b.strip()]
    expected = [tok(b, add_special_tokens=False)["input_ids"] for b in blocks_read]
    assert trainer_docs(tok, tmp_path, path, "text") == expected
    for workers in (2, 3):
        assert as_lists(read_megatron(run(tmp_path, f"w{workers}", [path], "text", workers=workers))) == expected
    lines = [line for _, line, _ in read_lines(Part(path))]
    with open(path, encoding="utf-8") as f:
        assert lines == list(f)


def test_parquet_row_groups_split_across_workers(tmp_path, tok):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": docs(200, 3)}), path, row_group_size=30)
    expected = trainer_docs(tok, tmp_path, path, "parquet", "body")
    assert len(shared.plan_parts([path], "parquet", 3, "body")) == 3
    for workers in (1, 3):
        out = run(tmp_path, f"w{workers}", [path], "parquet", "--text-field", "body", workers=workers)
        assert as_lists(read_megatron(out)) == expected


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_chat_tokens_and_targets_equal_the_trainers(tmp_path, tok, train_on):
    ref = load_sft_corpus(DataSource(path=str(BUNDLED_SFT_TRAIN), format="messages"), tok,
                          DataConfig(train_on=train_on), tmp_path / "cache")
    for workers in (1, 2):
        prefix = run(tmp_path, f"w{workers}", [BUNDLED_SFT_TRAIN], "messages", "--train-on", train_on,
                     workers=workers)
        assert as_lists(read_megatron(prefix)) == as_lists(ref)
        targets = read_megatron(f"{prefix}.targets")
        assert np.array_equal(targets.offsets, ref.offsets)
        assert np.array_equal(np.asarray(targets.tokens).astype(bool), np.asarray(ref.targets))
    ds = indexed.IndexedDataset(f"{prefix}.targets")
    assert ds.index.dtype == np.uint8 and len(ds) == ref.num_docs


def test_append_eod_ends_documents_with_eos(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(5)))
    plain = as_lists(read_megatron(run(tmp_path, "plain", [path], "jsonl_text")))
    eod = as_lists(read_megatron(run(tmp_path, "eod", [path], "jsonl_text", "--append-eod")))
    assert eod == [d + [tok.eos_token_id] for d in plain]
    # The trainer packs both into the same rows: no second EOS after an --append-eod document.
    from trainer.data.build import build_split

    rows = []
    for name in ("plain", "eod"):
        cfg = DataConfig(path=str(tmp_path / name), format="megatron", seq_len=16, val_fraction=0.2)
        split = build_split(cfg, tok, "train", tmp_path / f"cache-{name}")
        rows.append(split.rows.gather(np.arange(split.rows.num_rows)))
        assert split.stats[0]["eod"] is (name == "eod")
    for f in rows[0]:
        np.testing.assert_array_equal(rows[0][f], rows[1][f], err_msg=f)


def test_resume_skips_finished_parts(tmp_path, tok, monkeypatch, capsys):
    for name, seed in (("a", 4), ("b", 5), ("c", 6)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(20, seed)))
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    fresh = as_lists(read_megatron(run(tmp_path, "fresh", inputs, "jsonl_text")))
    real, calls = pretrain.tokenize_part, []

    def interrupted(part, *a, **k):
        calls.append(part.path.name)
        if part.path.name == "b.jsonl":
            raise KeyboardInterrupt  # the job stops mid-way
        return real(part, *a, **k)

    monkeypatch.setattr(pretrain, "tokenize_part", interrupted)
    argv = [a for i in inputs for a in ("--input", str(i))] + ["--format", "jsonl_text", "--output-prefix",
                                                               str(tmp_path / "out")]
    assert preprocess.main(argv) == 130  # Ctrl-C: one line, no traceback, saying what is kept and why
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"meshtron-preprocess: interrupted (1 finished part kept in {tmp_path / 'out.parts'}: the same "
                   f"command resumes from them; delete it to start over)")
    assert calls == ["a.jsonl", "b.jsonl"] and not (tmp_path / "out.idx").exists()
    calls.clear()
    monkeypatch.setattr(pretrain, "tokenize_part", lambda part, *a, **k: calls.append(part.path.name)
                        or real(part, *a, **k))
    assert preprocess.main(argv) == 0
    assert calls == ["b.jsonl", "c.jsonl"]  # a.jsonl's part was done
    assert as_lists(read_megatron(tmp_path / "out")) == fresh


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert preprocess.main(["--input", str(tmp_path / "nope.jsonl"), "--format", "jsonl_text",
                            "--output-prefix", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshtron-preprocess: error: --input[0]=") and "does not exist" in err
    assert len(err.splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(50)) + '{"text": 3}\n')
    assert preprocess.main(["--input", str(bad), "--format", "jsonl_text", "--output-prefix", out,
                            "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"meshtron-preprocess: error: {bad}:51: field 'text' is int")
    assert "--on-bad-row skip" in err and "data." not in err  # this command's flag, not the trainer's key
    assert not Path(f"{out}.parts").exists()  # a bad row needs another input or flag: no run could resume
    with pytest.raises(SystemExit) as exit_:
        preprocess.main(["--input", str(bad), "--format", "csv", "--output-prefix", out])
    assert exit_.value.code == 2
    assert preprocess.main(["--input", str(bad), "--format", "jsonl_text", "--output-prefix", out,
                            "--on-bad-row", "skip"]) == 0
    assert read_megatron(out).num_docs == 50
    assert json.loads(Path(f"{out}.meta.json").read_text())["bad_rows"] == {str(bad): 1}
