"""parallel.compile=true end to end on CPU (inductor): `python -m trainer` with compiled blocks and loss
chunks trains to the numbers of the eager run (4 optimizer steps, fp32: losses within 1e-5 relative, final
parameters within 1e-5), and the packed batches' varying layouts recompile only a bounded number of times."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MODEL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=3",
         "model.num_attention_heads=4", "model.num_query_groups=2"]
# Rows of 32 tokens from the bundled corpus: some batches hold one document per row (plain causal), others
# packed documents (a document-id mask), so the compiled blocks see both layouts. A loss chunk of 48 tokens
# over micro-batches of 4 x 32 = 128 tokens leaves a shorter last chunk.
RUN = ["data.seq_len=32", "trainer.global_batch_size=8", "parallel.microbatch_size=4", "trainer.eval_every=0",
       "logging.wandb=false", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.eps=1e-6",
       "trainer.loss_chunk_size=48", "trainer.max_steps=4"]


def run_trainer(tmp: Path, name: str, *overrides: str, nproc: int = 1, logs: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if logs:
        env["TORCH_LOGS"] = logs
    cmd = [sys.executable, "-m", "trainer"] if nproc == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc), "-m", "trainer"]
    proc = subprocess.run([*cmd, f"trainer.output_dir={tmp / name}", *MODEL, *RUN, *overrides], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run: Path, ref: Path) -> None:
    losses, ref_losses = [r["loss"] for r in metrics(run)], [r["loss"] for r in metrics(ref)]
    assert len(losses) == len(ref_losses) >= 3
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: compiled loss {a} vs eager {b}"
    params, ref_params = load_file(str(run / "hf" / "model.safetensors")), load_file(str(ref / "hf" / "model.safetensors"))
    assert params.keys() == ref_params.keys()
    for key in ref_params:
        torch.testing.assert_close(params[key], ref_params[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def recompiles(stderr: str) -> list[str]:
    """TORCH_LOGS=recompiles: one 'Recompiling function <name>' entry per guard miss."""
    return re.findall(r"Recompiling function (\w+)", stderr)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    run_trainer(tmp, "eager")
    return tmp


@pytest.mark.slow
def test_compiled_training_matches_eager_and_recompiles_a_bounded_number_of_times(eager):
    proc = run_trainer(eager, "compiled", "parallel.compile=true", logs="recompiles")
    assert_same_training(eager / "compiled", eager / "eager")
    # Four steps of packed and unpacked batches: each layout variant (plain causal or a document mask, the
    # layout's cache empty or filled) and the short last loss chunk is one more graph, once; a recompile per
    # step or per layer would show up as one entry per step and layer.
    seen = recompiles(proc.stderr)
    assert len(seen) <= 6, f"{len(seen)} recompiles in 4 steps:\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_compiled_with_selective_checkpointing_matches_eager(eager):
    """The checkpoint wrapper is what gets compiled: the recompute runs inside the compiled backward."""
    run_trainer(eager, "compiled_ac", "parallel.compile=true", "parallel.activation_checkpoint=selective")
    assert_same_training(eager / "compiled_ac", eager / "eager")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_ranks_compiled_matches_single_process_eager(eager):
    """FSDP2 wraps the compiled blocks: its all-gather hooks run around each block's graph."""
    run_trainer(eager, "fsdp_compiled", "parallel=fsdp", "parallel.compile=true", nproc=2)
    assert_same_training(eager / "fsdp_compiled", eager / "eager")
