"""Expert parallelism on NCCL: `torchrun -m trainer` at ep 2 over 2 GPUs trains an MoE model to one GPU's losses.
Skipped with fewer than 2 CUDA devices (NCCL takes one rank per GPU); the CPU proofs of the same code are
tests/distributed/test_moe_layouts.py and the ep2 cases of tests/distributed/test_mesh_matrix.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_env import cli_env

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

RUN = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
       "model.num_query_groups=2", "model.family=mixtral", "model.moe.num_moe_experts=8",
       "model.moe.moe_router_topk=2", "data.seq_len=64", "trainer.global_batch_size=8", "trainer.max_steps=3",
       "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false", "trainer.device=cuda",
       "trainer.precision=fp32", "optim.warmup_steps=0"]


def _losses(tmp: Path, name: str, nproc: int, extra: list[str]) -> list[float]:
    env = cli_env(tmp)
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", "trainer"] if nproc > 1 else [sys.executable, "-m", "trainer"]
    out = tmp / name
    proc = subprocess.run([*cmd, *RUN, *extra, f"trainer.output_dir={out}"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ep2_on_two_gpus_matches_one_gpu(tmp_path):
    single = _losses(tmp_path, "single", 1, [])
    ep2 = _losses(tmp_path, "ep2", 2, ["parallel=fsdp", "parallel.ep=2"])
    assert len(ep2) == len(single) == 3
    for a, b in zip(ep2, single):
        assert a == pytest.approx(b, rel=1e-4)
