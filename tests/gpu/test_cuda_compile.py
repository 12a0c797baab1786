"""parallel.compile=true on CUDA in bf16: compiled blocks and loss chunks train to the eager run's numbers
within bf16 rounding (inductor reorders bf16 reductions, so not bitwise), on packed rows (varlen/flex
attention through auto) and one-document rows; and the layouts settle after a few recompiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_env import cli_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODEL = ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_layers=4",
         "model.num_attention_heads=8", "model.num_query_groups=4"]
RUN = ["data.seq_len=256", "trainer.global_batch_size=8", "parallel.microbatch_size=2", "trainer.eval_every=0",
       "logging.wandb=false", "trainer.export_hf=false", "trainer.max_steps=6", "optim.warmup_steps=0",
       "optim.lr=1e-3", "trainer.device=cuda", "trainer.precision=bf16", "trainer.loss_chunk_size=384"]


def _run(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = cli_env(tmp, TORCH_LOGS="recompiles")
    proc = subprocess.run([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp / name}", *MODEL, *RUN,
                           *overrides], cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_compiled_bf16_training_tracks_eager(tmp_path, ac):
    _run(tmp_path, "eager", f"parallel.activation_checkpoint={ac}")
    proc = _run(tmp_path, "compiled", f"parallel.activation_checkpoint={ac}", "parallel.compile=true")
    for step, (a, b) in enumerate(zip(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager")), start=1):
        assert a == pytest.approx(b, rel=2e-2), f"step {step}: compiled {a} vs eager {b}"
    # Six steps of varying packed layouts (doc_lens of varying width): automatic dynamic shapes settle them.
    recompiles = re.findall(r"Recompiling function (\w+)", proc.stderr)
    assert len(recompiles) <= 8, proc.stderr[-4000:]
