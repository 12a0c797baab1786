"""`python -m trainer.launch`: the rendered sbatch script (from the real slurm/train.sbatch), the check of
nodes x gpus against the mesh, submission through a fake `sbatch`, secrets kept out of the script; and the
wandb run id carried across a preemption and its resume."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.config import LauncherConfig, ParallelConfig
from trainer.launch import check_world, log_file, render
from tests import faults

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "slurm" / "train.sbatch"
# 32 ranks: pp 2 x dp_shard 8 x tp 2; 4 micro-batches per step (64 / (8 x 2)).
MESH_32 = ["parallel=pp2_fsdp2_tp2", "parallel.dp_shard=8", "trainer.global_batch_size=64"]
SETUP = "source /opt/venvs/meshtron/bin/activate"
BASH = shutil.which("bash") or "/bin/bash"  # found before tests narrow PATH


def launch_cli(tmp: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.launch", *overrides], cwd=tmp, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def launch_here(capsys, monkeypatch, *overrides: str) -> tuple[int, str, str]:
    """trainer.launch in this process (Hydra's entry point as the CLI runs it): (exit code, stdout, stderr)."""
    from trainer.launch import main

    monkeypatch.setattr(sys, "argv", ["trainer.launch", *overrides])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def fake_bin(tmp: Path, name: str, body: str) -> Path:
    """A directory holding one executable `name` that records its arguments in <tmp>/<name>.args."""
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    exe = d / name
    exe.write_text(f'#!/bin/sh\necho "$@" >> {tmp / (name + ".args")}\n{body}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return d


def test_dry_run_renders_the_real_template_for_4_nodes_x_8_gpus(tmp_path):
    assert TEMPLATE.is_file(), "slurm/train.sbatch is missing"
    # `--dry-run` is the short form of launcher.dry_run=true.
    proc = launch_cli(tmp_path, "--dry-run", "launcher.nodes=4", "launcher.gpus_per_node=8", *MESH_32,
                      f"launcher.setup='{SETUP}'", "trainer.max_steps=1000", "data.path=/data/my corpus.jsonl",
                      "trainer.output_dir=runs/big")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'runs/big/logs/%x-%j.out'}"):
        assert line + "\n" in script, line
    assert "--partition" not in script and "--account" not in script
    setup = script.split("# >>> meshtron setup\n")[1].split("# <<< meshtron setup")[0]
    assert setup == f"{SETUP}\nexport MESHTRON_HOME=${{MESHTRON_HOME:-{ROOT}}}\n"  # finds slurm/env.sh
    block = script.split("# >>> meshtron overrides\n")[1].split("# <<< meshtron overrides")[0]
    assert "launcher." not in block
    assert block == ("set -- \\\n  parallel=pp2_fsdp2_tp2 \\\n  parallel.dp_shard=8 \\\n  trainer.global_batch_size=64 \\\n"
                     "  trainer.max_steps=1000 \\\n  'data.path=/data/my corpus.jsonl' \\\n"
                     f"  trainer.output_dir={tmp_path / 'runs/big'} \\\n  \"$@\"\n")
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run([BASH, "-n", str(tmp_path / "job.sbatch")], timeout=60).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sbatch"]  # a dry run writes nothing
    # The overrides block hands the trainer exactly these arguments, plus any given to sbatch.
    args = subprocess.run([BASH, "-c", block + 'printf "%s\\n" "$@"', "x", "extra=1"],
                          capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert args[3:] == ["trainer.max_steps=1000", "data.path=/data/my corpus.jsonl",
                        f"trainer.output_dir={tmp_path / 'runs/big'}", "extra=1"]


def test_mesh_mismatch_exits_2_naming_both_numbers_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, "sbatch", "echo 1")))
    code, out, err = launch_here(capsys, monkeypatch, "launcher.nodes=4", "launcher.gpus_per_node=8", "parallel=pp2_fsdp2_tp2",
                                 "trainer.output_dir=run")
    assert code == 2 and out == ""
    assert "launcher.nodes=4 x launcher.gpus_per_node=8 = 32 GPUs" in err and "mesh has 8 ranks" in err
    assert "launcher.nodes=1" in err  # what to change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # no script, no output dir, no sbatch call


def test_other_divisibility_rules_are_checked_at_the_launch_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # fsdp on 32 ranks x micro-batch 2 needs a global batch divisible by 64.
    code, _, err = launch_here(capsys, monkeypatch, "launcher.nodes=4", "launcher.gpus_per_node=8", "parallel=fsdp",
                               "launcher.dry_run=true")
    assert code == 2 and "trainer.global_batch_size=16 is not divisible by data-parallel degree 32" in err


def test_check_world_with_inferred_dp_shard():
    assert check_world(ParallelConfig(tp=2, dp_shard=-1), LauncherConfig(nodes=2, gpus_per_node=4)) == 8
    with pytest.raises(Exception, match=r"= 6 GPUs, but the parallel mesh needs a multiple of 4"):
        check_world(ParallelConfig(tp=2, pp=2), LauncherConfig(nodes=3, gpus_per_node=2))


def test_submit_with_fake_sbatch_prints_job_id_and_log_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, "sbatch", "echo '4242;cluster'")))
    code, out, err = launch_here(capsys, monkeypatch, "launcher.nodes=2", "launcher.gpus_per_node=4", "parallel=fsdp",
                                 "trainer.global_batch_size=16", "launcher.job_name=exp1", "launcher.partition=gpu",
                                 "launcher.time=02:00:00", "trainer.output_dir=runs/a")
    assert code == 0, err
    run = tmp_path / "runs" / "a"
    script = run / "launch" / "train.sbatch"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert "submitted job 4242" in out
    assert f"logs: {run / 'logs' / 'exp1-4242.out'}" in out
    assert (run / "logs").is_dir()  # Slurm does not create the --output directory itself
    text = script.read_text()
    for line in ("#SBATCH --job-name=exp1", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", f"export PYTHON={sys.executable}",
                 f"export MESHTRON_HOME=${{MESHTRON_HOME:-{ROOT}}}"):
        assert line + "\n" in text, line
    assert subprocess.run([BASH, "-n", str(script)], timeout=60).returncode == 0


def test_missing_sbatch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    code, _, err = launch_here(capsys, monkeypatch, "launcher.nodes=1", "launcher.gpus_per_node=1", "trainer.output_dir=run")
    assert code == 1 and "sbatch is not on PATH" in err and "launcher.dry_run=true" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["logging.wandb_api_key=sk-abc123secret",
                                      "launcher.setup='export WANDB_API_KEY=sk-abc123secret'"])
def test_secret_is_refused_and_not_printed(tmp_path, capsys, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    code, out, err = launch_here(capsys, monkeypatch, "launcher.dry_run=true", "launcher.nodes=1", "launcher.gpus_per_node=1",
                                 override)
    assert code == 2 and "sk-abc123secret" not in out + err
    assert "export" in err and ("WANDB_API_KEY" in err or "wandb_api_key" in err)


def test_missing_template_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = launch_here(capsys, monkeypatch, "launcher.dry_run=true", "launcher.nodes=1", "launcher.gpus_per_node=1",
                               f"launcher.template={tmp_path / 'none.sbatch'}")
    assert code == 2 and "launcher.template=" in err and "none.sbatch': no such file" in err


def test_render_options_srun_mode_no_requeue_extra_lines(tmp_path):
    lc = LauncherConfig(nodes=2, gpus_per_node=4, mode="srun", requeue=False, account="proj", cpus_per_task=6,
                        extra_sbatch=["--qos=high", "#SBATCH --exclusive"], setup=None, python="python3",
                        signal_seconds=120)
    script = render(TEMPLATE.read_text(), lc, ["model=tiny"], tmp_path / "logs")
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=4" in header and "#SBATCH --cpus-per-task=6" in header
    assert "#SBATCH --requeue" not in header and "#SBATCH --no-requeue" in header
    assert "#SBATCH --signal=B:USR1@120" in header and "#SBATCH --account=proj" in header
    assert header[-2:] == ["#SBATCH --qos=high", "#SBATCH --exclusive"]
    setup = script.split("# >>> meshtron setup\n")[1].split("# <<< meshtron setup")[0]
    assert setup.endswith("export PYTHON=python3\nexport MESHTRON_LAUNCH=srun  # launcher.mode=srun: one task per "
                          "GPU, no torchrun\n")
    # sbatch reads #SBATCH lines only up to the first command: all of them come before it.
    lines = script.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_cmd


def test_log_file_pattern():
    assert log_file(Path("/r/logs/%x-%j.out"), "77", "exp") == Path("/r/logs/exp-77.out")
    assert log_file(Path("/r/%A_%%.log"), "5", "x") == Path("/r/5_%.log")


# ------------------------------------------------------------------------- preemption, requeue, wandb

SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "data.seq_len=32", "trainer.global_batch_size=4", "parallel.microbatch_size=2",
         "trainer.eval_every=0", "trainer.export_hf=false", "trainer.max_steps=4", "logging.wandb=true"]


def test_preempted_run_requeues_and_resumed_run_continues_the_wandb_run(tmp_path):
    """USR1 -> checkpoint -> exit 75 -> `scontrol requeue <job>` (a fake scontrol that answers Requeue=1 and
    records its calls, and whether the checkpoint was complete by then) -> the rerun resumes in the same
    directory and logs to the same wandb run id (offline)."""
    pytest.importorskip("wandb")
    ckpt = tmp_path / "run" / "checkpoints"
    bindir = fake_bin(tmp_path, "scontrol", f"""
case "$1" in
  show) echo "JobId=$4 JobName=meshtron Requeue=1 Restarts=0 BatchFlag=1" ;;
  requeue) ls {ckpt}/*/COMPLETE >> {tmp_path / 'complete_at_requeue'} ;;
esac""")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_API_KEY": "",
           "SLURM_JOB_ID": "777", "PATH": f"{bindir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}", *SMALL]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=faults.env(env, step_sleep_s=0.5), stdout=log,
                                stderr=subprocess.STDOUT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, (tmp_path / "first.log").read_text()
    first = (tmp_path / "first.log").read_text()
    assert "slurm: requeued job 777" in first
    assert (tmp_path / "scontrol.args").read_text().splitlines() == ["show job -o 777", "requeue 777"]
    assert (tmp_path / "complete_at_requeue").read_text().strip()  # the checkpoint was complete by then
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}
