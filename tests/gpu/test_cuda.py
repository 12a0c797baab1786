"""The CPU-proven paths on a CUDA device: parity with transformers, training, bf16. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_env import cli_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_logits_match_transformers_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    from checkpoint_convert.hf import load_hf_weights, read_hf_config
    from trainer.model import GPTModel

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      tie_word_embeddings=True)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = GPTModel(read_hf_config(tmp_path)).cuda().eval()
    load_hf_weights(model, tmp_path)
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids.cuda()).float().cpu()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def _train(tmp_path: Path, *overrides: str) -> list[dict]:
    env = cli_env(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", f"trainer.output_dir={out}", "trainer.device=cuda",
                           "logging.wandb=false", "trainer.export_hf=false", *overrides],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_loss_falls_on_cuda(tmp_path, precision):
    rows = _train(tmp_path, "trainer.max_steps=40", "trainer.eval_every=20", f"trainer.precision={precision}")
    assert rows[-1]["loss"] <= 0.8 * rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_cuda_run_is_deterministic_enough(tmp_path):
    a = _train(tmp_path / "a", "trainer.max_steps=5", "trainer.eval_every=0")
    b = _train(tmp_path / "b", "trainer.max_steps=5", "trainer.eval_every=0")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
