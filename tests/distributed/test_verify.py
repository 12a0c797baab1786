"""`torchrun -m trainer.verify`: the user's layout on a shrunken copy of their model, against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from parallel.dims import ParallelDims
from trainer.config import ModelConfig
from trainer.verify import compare, shrink_model, verdict


def test_shrunk_model_keeps_structure_and_fits_the_mesh():
    big = ModelConfig(name="q", family="qwen3", vocab_size=151936, hidden_size=4096, ffn_hidden_size=12288,
                      num_layers=36, num_attention_heads=32, num_query_groups=8, kv_channels=128,
                      qk_layernorm=True, tie_word_embeddings=True, sliding_window=4096)
    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=4, pp=2, cp=1, world_size=16)
    small = shrink_model(big, dims, virtual_stages=2)
    small.validate()
    assert small.family == "qwen3" and small.qk_layernorm and small.tie_word_embeddings and small.sliding_window
    assert small.num_attention_heads // small.num_query_groups == 4
    assert small.num_query_groups % 4 == 0 and small.num_attention_heads % 4 == 0
    assert small.ffn_hidden_size % 4 == 0 and small.num_layers % (2 * 2) == 0
    assert small.hidden_size <= 128


def _fake_run(path: Path, losses: list[float], weight: torch.Tensor) -> Path:
    (path / "hf").mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                for i, v in enumerate(losses)))
    save_file({"w": weight}, str(path / "hf" / "model.safetensors"))
    return path


def test_compare_reports_relative_loss_and_parameter_differences(tmp_path):
    a = _fake_run(tmp_path / "a", [2.0, 1.0], torch.zeros(3))
    b = _fake_run(tmp_path / "b", [2.0, 1.001], torch.tensor([0.0, 0.5, 0.0]))
    rows, worst = compare(a, b)
    assert rows[0] == (1, 2.0, 2.0, 0.0)
    assert rows[1][3] == pytest.approx(0.001 / 1.001)
    assert worst == 0.5


def test_the_verdict_follows_from_the_printed_comparisons():
    """Each gating comparison is printed against its own bound, and the verdict is what those lines say: a
    parameter difference of 1.4e-05 passes the 10 x 1e-5 bound, and says so, instead of printing the loss
    tolerance beside it."""
    lines, ok = verdict(3e-6, 1.4e-5, 1e-5)
    assert ok and lines == ["max relative loss difference 3.00e-06: ok (at most 1.0e-05, verify.tolerance)",
                            "max parameter difference 1.40e-05: ok (at most 1.0e-04, 10 x verify.tolerance)"]
    lines, ok = verdict(2e-5, 1.4e-5, 1e-5)
    assert not ok and lines[0].startswith("max relative loss difference 2.00e-05: TOO LARGE") and "ok" in lines[1]
    lines, ok = verdict(0.0, 2e-4, 1e-5)
    assert not ok and "TOO LARGE" in lines[1]


@pytest.mark.distributed
def test_verify_passes_for_tp2(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.verify", "parallel=tp2", "model=llama3_2_1b"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "meshtron verify: OK" in proc.stdout
    assert "rel diff" in proc.stdout and "'tp': 2" in proc.stdout
    assert "max relative loss difference" in proc.stdout
    assert ": ok (at most 1.0e-04, 10 x verify.tolerance)" in proc.stdout
    assert not list(tmp_path.glob("meshtron-verify-*")), "an OK verify leaves its runs behind"
