"""Checkpoint and resume on one process through the CLI: bitwise-equal resume, non-finite losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import faults

SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "data.seq_len=32", "trainer.global_batch_size=4", "parallel.microbatch_size=2",
         "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false", "optim.warmup_steps=2"]


def cli(tmp: Path, out: str, *overrides: str, check: bool = True, **fault) -> subprocess.CompletedProcess:
    """`python -m trainer` on one process; `fault` (tests/faults.py) makes faults happen in it; a run stopped
    by stop_after_step exits 75 like a preempted one."""
    env = faults.env({**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled",
                      "OMP_NUM_THREADS": "1"}, **fault)
    proc = subprocess.run([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp / out}", *SMALL, *overrides],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    ok = 75 if fault.get("stop_after_step") else 0
    if check and proc.returncode != ok:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    cli(tmp, "straight", "trainer.max_steps=12")
    return tmp, rows(tmp / "straight")


def _restarted(tmp: Path, name: str, stops: list[int]) -> list[dict]:
    for stop in stops:
        proc = cli(tmp, name, "trainer.max_steps=12", stop_after_step=stop)
        assert f"faults: stop after step {stop}" in proc.stdout
    proc = cli(tmp, name, "trainer.max_steps=12")
    assert f"resumed from {tmp / name / 'checkpoints' / f'step_{stops[-1]}'} at step {stops[-1]}" in proc.stdout
    return rows(tmp / name)


def test_resume_6_plus_6_is_bitwise_equal(straight):
    tmp, ref = straight
    got = _restarted(tmp, "six", [6])
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    ck = tmp / "six" / "checkpoints" / "step_6"
    for name in ("COMPLETE", ".metadata", "trainer_state.pt", "config.yaml", "rng/rank_00000.pt",
                 "hf/config.json", "hf/tokenizer.json"):
        assert (ck / name).is_file(), name
    assert (tmp / "six" / "checkpoints" / "latest").read_text().strip() == "step_6"


@pytest.mark.slow
def test_two_restarts_and_periodic_checkpoints_are_bitwise_equal(straight):
    """4 + 4 + 4 steps with periodic saves every 2 steps, keep_last=2, async saves."""
    tmp, ref = straight
    extra = ["trainer.checkpoint.every_steps=2", "trainer.checkpoint.keep_last=2", "trainer.checkpoint.async_save=true"]
    for stop in (4, 8):
        cli(tmp, "three", "trainer.max_steps=12", *extra, stop_after_step=stop)
    cli(tmp, "three", "trainer.max_steps=12", *extra)
    got = rows(tmp / "three")
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    kept = sorted(p.name for p in (tmp / "three" / "checkpoints").glob("step_*"))
    assert kept == ["step_10", "step_12"]


def test_load_from_and_resume_never(straight, tmp_path):
    tmp, ref = straight
    cli(tmp_path, "a", "trainer.max_steps=12", stop_after_step=3)
    # resume=never in the same directory starts afresh: step 1's loss again.
    cli(tmp_path, "a", "trainer.max_steps=4", "trainer.checkpoint.resume=never")
    assert rows(tmp_path / "a")[-4]["loss"] == ref[0]["loss"]
    # load_from into a new directory continues from step 3.
    cli(tmp_path, "b", "trainer.max_steps=12", f"trainer.checkpoint.load_from={tmp_path / 'a' / 'checkpoints'}")
    got = rows(tmp_path / "b")
    assert [r["step"] for r in got] == list(range(4, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref[3:]]


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_shape_mismatch_and_malicious_pickle_are_refused(tmp_path):
    cli(tmp_path, "a", "trainer.max_steps=2", stop_after_step=1)
    proc = cli(tmp_path, "a", "trainer.max_steps=2", "model.ffn_hidden_size=96", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "decoder.layers.0.mlp" in proc.stderr and "[128, 64]" in proc.stderr and "[96, 64]" in proc.stderr
    # A pickle whose __reduce__ would create a file, planted in the checkpoint's non-DCP trainer state.
    import torch

    from checkpoint_convert.integrity import describe

    marker = tmp_path / "pwned"
    step = tmp_path / "a" / "checkpoints" / "step_1"
    torch.save({"step": 1, "x": _Evil(str(marker))}, step / "trainer_state.pt")
    proc = cli(tmp_path, "a", "trainer.max_steps=2", check=False)  # the file list sees the change first
    assert proc.returncode == 2 and "no intact checkpoint" in proc.stderr and "trainer_state.pt: " in proc.stderr
    # Someone who can write files can rewrite COMPLETE too: the weights-only load is what stops the pickle.
    record = json.loads((step / "COMPLETE").read_text())
    record["files"].update(describe(step, ["trainer_state.pt"]))
    (step / "COMPLETE").write_text(json.dumps(record))
    proc = cli(tmp_path, "a", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr and "trainer_state.pt" in proc.stderr
    assert not marker.exists()


def test_nonfinite_skip_drops_the_update_then_stops(tmp_path):
    proc = cli(tmp_path, "skip", "trainer.max_steps=6", "trainer.nonfinite=skip", "trainer.max_consecutive_skips=2",
               check=False, nan_loss_steps=[2, 4, 5, 6])
    assert proc.returncode == 3, proc.stderr[-3000:]
    got = rows(tmp_path / "skip")
    assert [r.get("skipped", False) for r in got] == [False, True, False, True, True]
    assert "non-finite loss at step 2" in proc.stdout and "rank(s) [0]" in proc.stdout
    assert "non-finite loss at step 6" in proc.stderr and "consecutive" in proc.stderr


def test_nonfinite_stop_exits_without_a_newer_checkpoint(tmp_path):
    proc = cli(tmp_path, "stop", "trainer.max_steps=6", "trainer.checkpoint.every_steps=2",
               check=False, nan_loss_steps=[3])
    assert proc.returncode == 3
    assert "non-finite loss at step 3" in proc.stderr and "rank(s) [0]" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == ["latest", "step_2"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_failed_save_exits_nonzero(tmp_path, mode):
    proc = cli(tmp_path, mode, "trainer.max_steps=4", "trainer.checkpoint.every_steps=2",
               f"trainer.checkpoint.async_save={mode == 'async'}", check=False, fail_save_step=2)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "checkpoint of step 2 failed" in proc.stderr and "simulated storage failure" in proc.stderr
    assert not (tmp_path / mode / "checkpoints" / "step_2").exists()


# ------------------------------------------------------------------ async commit and integrity


ASYNC4 = ["trainer.max_steps=12", "trainer.checkpoint.every_steps=4", "trainer.checkpoint.async_save=true"]


def test_async_save_commits_before_the_next_save_and_survives_sigkill(straight):
    """The background write of step 4 is committed at a step boundary, not at the next save (step 8): a SIGKILL
    after that commit and before step 8 resumes from step 4 and reproduces the uninterrupted run bitwise."""
    tmp, ref = straight
    proc = cli(tmp, "killed", *ASYNC4, check=False, kill_after_commit=4, step_sleep_s=0.2)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    killed_at = int(proc.stdout.split("faults: SIGKILL at step ")[1].split(",")[0])
    assert 5 <= killed_at < 8
    root = tmp / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_4" and (root / "step_4" / "COMPLETE").is_file()
    proc = cli(tmp, "killed", *ASYNC4)
    assert f"resumed from {root / 'step_4'} at step 4" in proc.stdout
    got = rows(tmp / "killed")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]


def _files_of(step: Path) -> set[str]:
    return {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {"COMPLETE"}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 6-step run with checkpoints of steps 3 and 6 (sync saves)."""
    tmp = tmp_path_factory.mktemp("integrity")
    cli(tmp, "run", "trainer.max_steps=6", "trainer.checkpoint.every_steps=3", "trainer.checkpoint.keep_last=0")
    return tmp / "run"


def test_complete_lists_every_file_with_size_and_checksum(two_checkpoints):
    from checkpoint_convert.integrity import crc32

    for step in ("step_3", "step_6"):
        d = two_checkpoints / "checkpoints" / step
        record = json.loads((d / "COMPLETE").read_text())
        assert record["step"] == int(step[5:]) and record["world_size"] == 1
        assert set(record["files"]) == _files_of(d)  # the per-rank manifests are gone, nothing unlisted
        assert {"__0_0.distcp", ".metadata", "trainer_state.pt", "rng/rank_00000.pt", "hf/tokenizer.json"} \
            <= set(record["files"])
        for rel, (size, crc) in record["files"].items():
            assert (d / rel).stat().st_size == size and crc32(d / rel) == crc, rel


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(two_checkpoints, tmp_path):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    shard = run / "checkpoints" / "step_6" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = cli(tmp_path, "run", "trainer.max_steps=8")
    assert f"{shard}: " in proc.stdout and "truncated" in proc.stdout
    assert f"using {run / 'checkpoints' / 'step_3'}, the newest intact checkpoint" in proc.stdout
    assert "at step 3" in proc.stdout
    assert [r["step"] for r in rows(run)] == list(range(1, 9))


def test_verify_full_catches_a_flipped_byte_and_no_intact_checkpoint_exits_2(two_checkpoints, tmp_path):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    for step in ("step_3", "step_6"):
        shard = run / "checkpoints" / step / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only a checksum sees it
        shard.write_bytes(bytes(data))
    proc = cli(tmp_path, "run", "trainer.max_steps=8", "trainer.checkpoint.verify=full", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("verifying")]  # bars
    assert len(err) == 1 and "no intact checkpoint" in err[0] and "Traceback" not in proc.stderr, proc.stderr
    for step in ("step_3", "step_6"):
        assert f"{run / 'checkpoints' / step / '__0_0.distcp'}: CRC-32" in err[0]
    assert "trainer.checkpoint.resume=never" in err[0]


def test_convert_refuses_a_damaged_checkpoint(two_checkpoints, tmp_path):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    target = run / "checkpoints" / "step_6" / "trainer_state.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "checkpoint_convert", "meshtron-to-hf", "--checkpoint",
                           str(run / "checkpoints"), "--out", str(tmp_path / "hf")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{target}: CRC-32" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "hf").exists()
