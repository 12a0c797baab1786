"""Checkpoints on gloo process groups, through `python -m trainer` on N ranks launched by the test itself
(so each rank's pid and exit code are known): bitwise resume at fsdp2, resharding across meshes, a rank
SIGKILLed in the middle of a save, and preemption by a real signal to one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import faults
from tests.distributed.launcher import free_port

MODEL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=4", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.tie_word_embeddings=true"]
RUN = ["data.seq_len=32", "trainer.global_batch_size=8", "trainer.eval_every=0", "logging.wandb=false",
       "trainer.export_hf=false", "optim.warmup_steps=2", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.eps=1e-6"]
FSDP2 = ["parallel=fsdp"]
STEPS = ["trainer.max_steps=8"]

pytestmark = pytest.mark.distributed


def launch(tmp: Path, out: str, nproc: int, overrides: list[str], **fault) -> list[subprocess.Popen]:
    """N ranks of `python -m trainer`; `fault` (tests/faults.py) makes faults happen in them."""
    env = faults.env({**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled",
                      "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                      "WORLD_SIZE": str(nproc)}, **fault)
    procs = []
    for r in range(nproc):
        log = open(tmp / f"{out}.rank{r}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", f"trainer.output_dir={tmp / out}", *MODEL, *RUN, *overrides],
            cwd=tmp, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run(tmp: Path, out: str, nproc: int, overrides: list[str], expect: int = 0, **fault) -> str:
    codes = wait(launch(tmp, out, nproc, overrides, **fault))
    log = "\n".join((tmp / f"{out}.rank{r}.log").read_text() for r in range(nproc))
    assert codes == [expect] * nproc, f"{out}: exit codes {codes}\n{log[-6000:]}"
    return log


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def trainer_state(ck: Path) -> dict:
    return torch.load(ck / "trainer_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_dist")
    run(tmp, "straight", 2, [*FSDP2, *STEPS])
    return tmp, metrics(tmp / "straight")


def test_fsdp2_resume_is_bitwise_equal(fsdp_straight):
    tmp, ref = fsdp_straight
    run(tmp, "halves", 2, [*FSDP2, *STEPS], expect=75, stop_after_step=4)
    log = run(tmp, "halves", 2, [*FSDP2, *STEPS])
    assert "resumed from" in log and "at step 4" in log
    got = metrics(tmp / "halves")
    assert sorted(got) == list(range(1, 9))
    assert [got[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]
    assert [got[s]["grad_norm"] for s in range(1, 9)] == [ref[s]["grad_norm"] for s in range(1, 9)]


def test_rank_killed_during_save_resumes_from_previous_checkpoint(fsdp_straight):
    tmp, ref = fsdp_straight
    args = [*FSDP2, *STEPS, "trainer.checkpoint.every_steps=2"]
    procs = launch(tmp, "killed", 2, args, pause_at_save_step=4, pause_seconds=120)
    partial = tmp / "killed" / "checkpoints" / ".tmp_step_4"
    deadline = time.time() + 300
    while not ((partial / ".metadata").is_file() and "faults: pausing" in (tmp / "killed.rank0.log").read_text()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "never reached the pause"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)  # a node lost between shard write and commit
    procs[1].wait(timeout=60)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=60)
    root = tmp / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_2"
    assert not (partial / "COMPLETE").exists() and not (root / "step_4").exists()

    log = run(tmp, "killed", 2, args)
    assert f"ignoring incomplete {partial}" in log and "at step 2" in log
    got = metrics(tmp / "killed")
    assert [got[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]


def test_sigusr1_to_one_rank_checkpoints_and_exits(fsdp_straight):
    tmp, ref = fsdp_straight
    procs = launch(tmp, "preempted", 2, [*FSDP2, *STEPS], step_sleep_s=0.5)
    deadline = time.time() + 300
    m = tmp / "preempted" / "metrics.jsonl"
    while not (m.is_file() and len(m.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no steps logged"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the all-reduce
    codes = wait(procs)
    log = (tmp / "preempted.rank0.log").read_text()
    assert codes == [75, 75], log[-4000:]
    assert "preempted by a signal to another rank" in log
    assert "preempted by SIGUSR1" in (tmp / "preempted.rank1.log").read_text()
    root = tmp / "preempted" / "checkpoints"
    step = int((root / "latest").read_text().strip().split("_")[1])
    assert 2 <= step < 8 and (root / f"step_{step}" / "COMPLETE").is_file()
    run(tmp, "preempted", 2, [*FSDP2, *STEPS])
    got = metrics(tmp / "preempted")
    assert sorted(got) == list(range(1, 9))
    assert got[8]["loss"] == ref[8]["loss"]


def test_nan_on_one_rank_stops_naming_step_and_rank(tmp_path):
    log = run(tmp_path, "nan", 2, [*FSDP2, "trainer.max_steps=3"], expect=3, nan_loss_steps=[2], nan_rank=1)
    assert "non-finite loss at step 2" in log and "rank(s) [1]" in log


@pytest.mark.slow
def test_resharding_fsdp2_tp2_to_tp2_pp2_and_dp4(tmp_path):
    """Saved at fsdp2 x tp2 (4 ranks), resumed at tp2 x pp2 and dp4: the first step after resume matches the
    original run's loss (1e-5) and the loader continues where it was. (Resuming on one process: the MoE test
    below, from ep2.)"""
    long = ["trainer.max_steps=6", "trainer.checkpoint.every_steps=1", "trainer.checkpoint.keep_last=0"]
    run(tmp_path, "orig", 4, ["parallel=tp2", *long])
    ref = metrics(tmp_path / "orig")
    saved = tmp_path / "orig" / "checkpoints"
    for name, nproc, parallel in [("tp2_pp2", 4, ["parallel=tp2_pp2"]), ("dp4", 4, ["parallel=fsdp"])]:
        log = run(tmp_path, name, nproc, [*parallel, "trainer.max_steps=6",
                                          f"trainer.checkpoint.load_from={saved / 'step_3'}"],
                  expect=75, stop_after_step=4)
        assert "at step 3" in log
        got = metrics(tmp_path / name)
        assert list(got) == [4]
        assert got[4]["loss"] == pytest.approx(ref[4]["loss"], rel=1e-5), name
        assert got[4]["tokens"] == ref[4]["tokens"]
        mine = trainer_state(tmp_path / name / "checkpoints" / "step_4")
        theirs = trainer_state(saved / "step_4")
        assert mine["loader"] == theirs["loader"], name
    # The last pipeline stage's tied copy is stored under the embedding's name, never as its own key.
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(tmp_path / "tp2_pp2" / "checkpoints" / "step_4")).read_metadata().state_dict_metadata
    assert "model.embedding.word_embeddings.weight" in keys
    assert not [k for k in keys if "output_layer" in k]


def test_moe_resharding_ep2_to_one_process_and_ep4(tmp_path):
    """An MoE model saved at ep2 (2 ranks, 4 experts each) resumes on one process and at ep4 x 4 ranks (2 experts
    each): the experts are stored as global [E, ...] tensors, and the step after resume matches (1e-5)."""
    import torch.distributed.checkpoint as dcp

    moe = ["model.family=qwen3_moe", "model.qk_layernorm=true", "model.moe.num_moe_experts=8", "model.moe.moe_ffn_hidden_size=32",
           "model.moe.moe_z_loss_coeff=0.01", "trainer.max_steps=4", "trainer.checkpoint.every_steps=3"]
    run(tmp_path, "ep2", 2, [*FSDP2, "parallel.ep=2", *moe])
    ref = metrics(tmp_path / "ep2")
    saved = tmp_path / "ep2" / "checkpoints" / "step_3"
    keys = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert list(keys["model.decoder.layers.0.mlp.experts.linear_fc1_gate.weight"].size) == [8, 32, 64]
    for name, nproc, parallel in [("ep1", 1, []), ("ep4", 4, [*FSDP2, "parallel.ep=4"])]:
        log = run(tmp_path, name, nproc, [*parallel, *moe, f"trainer.checkpoint.load_from={saved}"])
        assert "at step 3" in log
        got = metrics(tmp_path / name)
        assert list(got) == [4]
        for key in ("loss", "moe_aux_loss", "moe_z_loss"):
            assert got[4][key] == pytest.approx(ref[4][key], rel=1e-5), (name, key)


def test_async_commit_waits_for_every_rank_and_survives_sigkill(fsdp_straight):
    """Rank 1's background write is slowed: rank 0, done early, must not commit alone (the ranks agree in the
    step's reduction). The commit still comes before the next save, so SIGKILL after it resumes from step 4."""
    tmp, ref = fsdp_straight
    args = [*FSDP2, *STEPS, "trainer.checkpoint.every_steps=4", "trainer.checkpoint.async_save=true"]
    codes = wait(launch(tmp, "async", 2, args, write_delay_s=0.8, write_delay_rank=1, step_sleep_s=0.5,
                        kill_after_commit=4))
    log = "\n".join((tmp / f"async.rank{r}.log").read_text() for r in range(2))
    assert codes == [-9, -9], f"exit codes {codes}\n{log[-6000:]}"
    killed_at = {int(part.split(",")[0]) for part in log.split("faults: SIGKILL at step ")[1:]}
    assert len(killed_at) == 1 and 5 <= min(killed_at) < 8, killed_at
    step4 = tmp / "async" / "checkpoints" / "step_4"
    files = json.loads((step4 / "COMPLETE").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(files)
    log = run(tmp, "async", 2, args)
    assert "at step 4" in log
    got = metrics(tmp / "async")
    assert [got[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]
