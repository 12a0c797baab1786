"""The step's sync budget on CUDA, by torch's own detector: with torch.cuda.set_sync_debug_mode("warn") over
the step loop, every synchronizing CUDA call warns; the loop may make exactly one per step, the transfer in
trainer/step_vector.py StepVector.reduce (called by trainer/step.py step_totals). Also the metrics a GPU run adds (tflops, mfu from the detected peak, mem_gib)
and the loader's pinned batches. Skipped without CUDA; tests/unit/test_sync_budget.py proves the logic on CPU.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 4
CUDA = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "data.seq_len=64", "trainer.global_batch_size=8",
        "parallel.microbatch_size=2", f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
        "logging.wandb=false", "trainer.export_hf=false", "trainer.device=cuda", "optim.warmup_steps=0"]


def _transfer_line() -> tuple[str, int]:
    from trainer import step_vector

    lines, first = inspect.getsourcelines(step_vector.StepVector.reduce)
    offset = next(i for i, line in enumerate(lines) if ".cpu()" in line)
    return Path(step_vector.__file__).name, first + offset


def _watched_run(cfg, monkeypatch) -> list[warnings.WarningMessage]:
    import trainer.loop as loop

    original, caught = loop._run_steps, []

    def watched(*args):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                caught.extend(w for w in seen if "synchroniz" in str(w.message))

    monkeypatch.setattr(loop, "_run_steps", watched)
    loop.train(cfg)
    return caught


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_sync_per_step_on_cuda(tmp_path, compose, monkeypatch, precision):
    cfg = compose(*CUDA, f"trainer.precision={precision}", f"trainer.output_dir={tmp_path / 'run'}",
                  f"data.cache_dir={tmp_path / 'cache'}")
    syncs = _watched_run(cfg, monkeypatch)
    where = [(Path(w.filename).name, w.lineno) for w in syncs]
    assert where == [_transfer_line()] * STEPS, where
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tflops"] > 0 and r["mem_gib"] > 0 for r in rows)
    from trainer.flops import detected_peak_tflops

    peak = detected_peak_tflops(torch.cuda.get_device_name())
    assert all(("mfu" in r) == (peak is not None) for r in rows)
    if peak is not None:
        assert all(r["mfu"] == pytest.approx(r["tflops"] / peak) for r in rows)


def test_configured_peak_wins_on_cuda(tmp_path, compose, monkeypatch):
    cfg = compose(*CUDA, "trainer.peak_tflops=100", f"trainer.output_dir={tmp_path / 'run'}",
                  f"data.cache_dir={tmp_path / 'cache'}")
    _watched_run(cfg, monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 100) for r in rows)


def test_loader_pins_batches_for_cuda():
    import numpy as np

    from trainer.data.loader import GlobalBatchLoader
    from trainer.data.packing import PackedRows

    n, s = 16, 8
    a = np.arange(n * s, dtype=np.int64).reshape(n, s)
    rows = PackedRows("t", a, a, a % s, np.zeros_like(a), np.repeat(np.arange(n), s).reshape(n, s))
    with GlobalBatchLoader(rows, 4, seed=0, pin_memory=True) as loader:
        batch = next(loader)
    assert all(t.is_pinned() for t in batch.values())
    with GlobalBatchLoader(rows, 4, seed=0) as loader:
        assert not next(loader)["input_ids"].is_pinned()
