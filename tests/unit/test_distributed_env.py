"""Ranks from torchrun's or Slurm's environment, Slurm host lists, the rendezvous address, the requeue
decision (with a fake scontrol); and 2 `python -m trainer` processes started the way srun starts them (only
SLURM_* variables) training to the numbers of one process."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.distributed import RankInfo, expand_hostlist, rank_info, requeue_slurm_job, slurm_port, slurm_rendezvous

SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.mark.parametrize("hostlist,hosts", [
    ("localhost", ["localhost"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("n[1-2]", ["n1", "n2"]),
    ("a[8-11]b", ["a8b", "a9b", "a10b", "a11b"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x1,y[2,4],z", ["x1", "y2", "y4", "z"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node]1[", "node[a-b]"])
def test_expand_hostlist_refuses_malformed(bad):
    with pytest.raises(ValueError, match="host"):
        expand_hostlist(bad)


def test_torchrun_variables_win_over_slurm():
    env = {**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert rank_info(env) == RankInfo(5, 16, 5)


def test_srun_task_takes_rank_from_slurm():
    assert rank_info(SRUN_TASK) == RankInfo(3, 8, 1)


def test_batch_shell_and_one_task_allocation_run_one_process():
    # The batch shell carries SLURM_PROCID=0 and the allocation's task count, but no step id.
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert rank_info(batch) == RankInfo(0, 1, 0)
    one_task = {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert rank_info(one_task) == RankInfo(0, 1, 0)
    assert rank_info({}) == RankInfo(0, 1, 0)


def test_rendezvous_from_nodelist_and_job_id_unless_given():
    assert slurm_rendezvous(SRUN_TASK) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_port("4242"))}
    assert slurm_port("4242") == 24242
    given = {**SRUN_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
    assert slurm_rendezvous(given) == {}
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        slurm_rendezvous({"SLURM_JOB_ID": "1"})


# ------------------------------------------------------------------------------------------ requeue


def fake_scontrol(tmp: Path, show: str, requeue_rc: int = 0) -> dict:
    """PATH with an scontrol that records its arguments, prints `show` for `show job` and exits requeue_rc
    for `requeue`."""
    d = tmp / "bin"
    d.mkdir()
    exe = d / "scontrol"
    exe.write_text(f"""#!/bin/sh
echo "$@" >> {tmp / 'calls'}
case "$1" in
  show) echo '{show}' ;;
  requeue) [ {requeue_rc} = 0 ] || echo 'scontrol: error: Job is not requeueable' >&2; exit {requeue_rc} ;;
esac
""")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": str(d), "SLURM_JOB_ID": "99"}


def calls(tmp: Path) -> list[str]:
    return (tmp / "calls").read_text().splitlines() if (tmp / "calls").exists() else []


def test_requeue_when_submitted_with_requeue(tmp_path):
    env = fake_scontrol(tmp_path, "JobId=99 JobName=meshtron UserId=me(0) Requeue=1 Restarts=0 BatchFlag=1")
    lines = requeue_slurm_job(env)
    assert calls(tmp_path) == ["show job -o 99", "requeue 99"]
    assert lines == ["slurm: requeued job 99 (scontrol requeue 99); it resumes from the latest checkpoint"]


def test_no_requeue_without_the_flag(tmp_path):
    env = fake_scontrol(tmp_path, "JobId=99 JobName=meshtron Requeue=0 Restarts=0")
    assert "without --requeue" in requeue_slurm_job(env)[0]
    assert calls(tmp_path) == ["show job -o 99"]


def test_failed_requeue_is_logged_not_raised(tmp_path):
    env = fake_scontrol(tmp_path, "JobId=99 Requeue=1", requeue_rc=1)
    (line,) = requeue_slurm_job(env)
    assert "requeue of job 99 failed" in line and "not requeueable" in line


def test_nothing_outside_slurm_or_without_scontrol(tmp_path):
    assert requeue_slurm_job({"PATH": str(tmp_path)}) == []
    assert "scontrol is not on PATH" in requeue_slurm_job({"PATH": str(tmp_path), "SLURM_JOB_ID": "5"})[0]


# ------------------------------------------------------------------ srun-style processes, no torchrun

MODEL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2"]
RUN = ["data.seq_len=32", "trainer.global_batch_size=8", "parallel.microbatch_size=2", "trainer.eval_every=0",
       "logging.wandb=false", "trainer.export_hf=false", "optim.warmup_steps=1", "trainer.max_steps=3"]


def _job_id_with_free_port() -> str:
    """A job id whose derived port is free right now (the processes derive MASTER_PORT from it)."""
    for job in range(os.getpid() % 20000, os.getpid() % 20000 + 20000, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(str(job))))
                return str(job)
            except OSError:
                continue
    raise RuntimeError("no free port")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_srun_style_tasks_train_like_one_process(tmp_path):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    base |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'one'}", *MODEL, *RUN,
                             "parallel=single", "parallel.microbatch_size=2"],
                            cwd=tmp_path, env=base, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    job = _job_id_with_free_port()
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost"}
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'two'}",
                                       *MODEL, *RUN, "parallel=fsdp"], cwd=tmp_path, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs[-5000:]
    assert "on 2 x cpu" in logs and "dp_shard': 2" in logs
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.parametrize("visible,local_rank,index", [(8, 5, 5), (1, 5, 0), (2, 0, 0)])
def test_cuda_device_follows_the_local_rank_unless_one_gpu_is_visible(monkeypatch, visible, local_rank, index):
    import torch

    from trainer.loop import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert pick_device("cuda", local_rank) == torch.device("cuda", index)
    assert pick_device("cpu", local_rank) == torch.device("cpu")


def test_more_local_ranks_than_visible_gpus_is_refused(monkeypatch):
    import torch

    from trainer.errors import ConfigError
    from trainer.loop import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="local rank 5 but only 4 CUDA devices"):
        pick_device("auto", 5)


@pytest.mark.distributed
def test_srun_style_tasks_print_a_configuration_error_once(tmp_path):
    """Without torchrun nobody gathers the tasks' output: task 0 prints the error, and every task exits 2."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE")}
    base |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(2):
        env = {**base, "SLURM_JOB_ID": _job_id_with_free_port(), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost"}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}",
                                       *MODEL, *RUN, "parallel.tp=3"], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    line = ("meshtron: configuration error: parallel.dp_replicate*tp*pp*cp = 1*3*1*1 = 3 processes per model "
            "replica does not divide world size 2; start a multiple of 3 processes")
    assert outs[0][1].startswith(line) and outs[0][1].count("\n") == 1, outs[0][1]
    assert outs[1][1] == "", outs[1][1]
