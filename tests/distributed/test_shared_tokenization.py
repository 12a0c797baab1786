"""All ranks tokenize a missing source together (trainer.data.shared): the cache equals one process'
tokenization bit for bit (documents, order, bad-row counts), and the first error reaches every rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.launcher import run_ranks
from trainer.config import DataConfig, DataSource
from trainer.errors import ConfigError
from trainer.data import pretrain, shared
from trainer.data.sft import BUNDLED_SFT_TRAIN, load_sft_corpus
from trainer.data.shared import Share
from trainer.data.sources import Source

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tok():
    from trainer.data.tokenizer import load_tokenizer

    return load_tokenizer(DataConfig(), None)

WORDS = "ranks share the parts of one large file and rank zero merges them in order".split()


def write_corpus(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + f" {i}"})
             for i in range(300)]
    skip = list(lines)
    skip[40], skip[150], skip[280] = '{"text": broken', '{"no_text": 1}', '{"text": null}'
    (d / "skip").mkdir()
    (d / "skip" / "a.jsonl").write_text("\n".join(skip) + "\n")
    (d / "skip" / "b.jsonl").write_text("\n".join(lines[:9]) + "\n")
    errors = list(lines)
    errors[149], errors[279] = '{"text": 1}', '{"text": 2}'  # lines 150 and 280: different ranks' parts
    (d / "errors.jsonl").write_text("\n".join(errors) + "\n")
    (d / "c.txt").write_text("\n\n".join(json.loads(x)["text"].replace(" and ", "\nand ") for x in lines) + "\n")
    return {"skip": d / "skip", "errors": d / "errors.jsonl", "text": d / "c.txt"}


def tokenize_all(tok, paths: dict[str, Path], cache: Path, share: Share, crash_rank: int = -1) -> dict:
    """Every case on this rank: arrays and bad rows, or the error text."""
    out = {}
    cases = {"skip": ("jsonl_text", "skip"), "errors": ("jsonl_text", "error"), "text": ("text", "error")}
    for name, (fmt, policy) in cases.items():
        files = tuple(sorted(paths[name].rglob("*.jsonl"))) if paths[name].is_dir() else (paths[name],)
        try:
            corpus, bad = pretrain.read_source(Source(name, files, fmt, "text"), tok, cache / name, policy,
                                               share=share)
            out[name] = (np.asarray(corpus.tokens).tolist(), corpus.offsets.tolist(), bad)
        except ConfigError as e:
            out[name] = f"ConfigError: {e}"
    sft = load_sft_corpus(DataSource(path=str(BUNDLED_SFT_TRAIN), format="messages"), tok, DataConfig(),
                          cache / "sft", share=share)
    out["sft"] = (np.asarray(sft.tokens).tolist(), np.asarray(sft.targets).tolist(), sft.offsets.tolist())
    real = pretrain.tokenize_part

    def crash(*a, **k):
        raise RuntimeError("boom")

    pretrain.tokenize_part = crash if share.rank == crash_rank else real
    try:
        pretrain.read_source(Source("crash", (paths["text"],), "text", "text"), tok, cache / "crash", share=share)
        out["crash"] = "no error"
    except (ConfigError, RuntimeError) as e:
        out["crash"] = f"{type(e).__name__}: {e}"
    finally:
        pretrain.tokenize_part = real
    return out


def _rank(rank: int, world: int, root: str) -> dict:
    from trainer.data.tokenizer import load_tokenizer

    shared.MIN_PART_BYTES = 1  # split even these small files between the ranks
    paths = {k: Path(root) / v for k, v in (("skip", "skip"), ("errors", "errors.jsonl"), ("text", "c.txt"))}
    out = tokenize_all(load_tokenizer(DataConfig(), None), paths, Path(root) / "cache",
                       Share(rank, world, 120.0, "run-1"), crash_rank=world - 1)
    leftovers = sorted({p.parent.name for p in (Path(root) / "cache").rglob("*.parts")})
    return {**out, "leftovers": leftovers}


@pytest.mark.parametrize("world", [2, 3])
def test_shared_tokenization_equals_one_process(tmp_path, tok, world):
    paths = write_corpus(tmp_path)
    ref = tokenize_all(tok, paths, tmp_path / "ref-cache", shared.SOLO)
    assert ref["skip"][2] == {str(paths["skip"] / "a.jsonl"): 3}
    assert ref["errors"].startswith(f"ConfigError: {paths['errors']}:150: field 'text' is int")
    results = run_ranks(world, _rank, str(tmp_path), timeout=240)
    for rank, got in enumerate(results):
        for case in ("skip", "errors", "text", "sft"):
            assert got[case] == ref[case], (rank, case)
        # The rank that crashed raises its own error; every other rank names it.
        if rank == world - 1:
            assert got["crash"] == "RuntimeError: boom"
        else:
            assert got["crash"].startswith(f"ConfigError: rank {world - 1} failed tokenizing {paths['text']}: "
                                           f"RuntimeError: boom"), got["crash"]
    # Parts are removed after the merge; only failed attempts' stay (a rerun resumes from their done parts).
    assert all(set(r["leftovers"]) <= {"crash", "errors"} for r in results), [r["leftovers"] for r in results]


def test_a_missing_rank_times_out_with_progress(tmp_path, tok, monkeypatch, capsys):
    monkeypatch.setattr(shared, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(shared, "_REPORT_EVERY_S", 0.2)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    with pytest.raises(ConfigError, match=r"rank 0: gave up after 1 s \(trainer.dist_timeout_s=1\) waiting for "
                                          r"ranks \[1\] tokenizing: 1/2 parts done"):
        pretrain.read_source(Source("c", (path,), "jsonl_text", "text"), tok, tmp_path / "cache",
                             share=Share(0, 2, 1.0, "r"))
    assert "rank 0: waiting for ranks [1] tokenizing: 1/2 parts done" in capsys.readouterr().err
