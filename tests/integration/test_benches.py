"""The benches under bench/, run end to end in their CPU smoke modes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("config",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
@pytest.mark.extended  # its configurations' CPU smoke also runs in test_gpu_proof_dry_run_runs_every_stage_on_the_cpu
def test_gpu_throughput_cpu_smoke():
    """--device cpu: a measured line for the sdpa and transformers configurations (real tokens/s > 0, the
    random-init loss near ln(vocab)), the trainer's CUDA refusal for flex and varlen, the ratio line."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    head = next(line for line in proc.stdout.splitlines() if line.startswith("| config |"))
    columns = [c.strip() for c in head.strip().strip("|").split("|")]
    measured = ["hf-sdpa-pad", "hf-sdpa-bucket", "hf-sdpa-packed", "meshtron-sdpa", "meshtron-sdpa+chunk"]
    needs_cuda = ["hf-flex-packed"] + [f"meshtron-{b}{c}{k}" for b in ("varlen", "flex") for c in ("", "+chunk")
                                       for k in ("", "+compile")]
    needs_cuda += ["meshtron-varlen+chunk+fp8", "meshtron-varlen+chunk+compile+fp8"]  # varlen: CUDA before fp8
    assert set(measured + needs_cuda + ["meshtron-sdpa+compile", "meshtron-sdpa+chunk+compile"]) == set(rows)
    for name in measured:
        r = dict(zip(columns, rows[name]))
        assert r["status"] == "ok", (name, r)
        assert float(r["real tok/s"].replace(",", "")) > 0 and float(r["TFLOP/s"]) > 0, (name, r)
        assert abs(float(r["loss"]) - math.log(1024)) < 0.3, (name, r)  # random tokens, vocab 1024
        assert float(r["peak RSS GiB"]) > 0 and r["vs hf-sdpa-pad"].endswith("x"), (name, r)
    for name in needs_cuda:
        assert rows[name][-1].startswith("skipped: needs CUDA"), (name, rows[name])
    ratio = re.search(r"^ratio: best meshtron \((meshtron-sdpa\S*)\) real tokens/s = ([\d.]+)x hf-sdpa-pad, "
                      r"([\d.]+)x hf-sdpa-bucket$", proc.stdout, re.M)
    assert ratio and float(ratio[2]) > 0 and float(ratio[3]) > 0, proc.stdout
    assert re.search(r"^goal: MFU >= 40% of datasheet \(packed\): n/a", proc.stdout, re.M), proc.stdout
    assert re.search(r"^goal: >= 1.5x hf-sdpa-pad real tokens/s: [\d.]+x \(meshtron-sdpa\S*\) -> (met|missed)$",
                     proc.stdout, re.M), proc.stdout


def test_gpu_proof_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """bench/gpu_proof.py --dry-run: each stage printed with its time box and command, then run on the CPU and
    passed or skipped (the probe stops after the environment, every tests/gpu case skips, the bench smoke
    measures the transformers baseline and refuses the CUDA-only configurations), results under --out."""
    out = tmp_path / "proof"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_proof.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in summary] == ["wheels", "probe", "tests", "bench"]
    assert summary[0]["outcome"].startswith("skipped") and all(s["outcome"] == "passed" for s in summary[1:])
    for stage in ("probe", "tests", "bench"):
        assert re.search(rf"^=== {stage} \(time box \d+ s, at \+\d+ s\): ", proc.stdout, re.M), stage
    probe = [json.loads(line) for line in (out / "probe.log").read_text().splitlines() if line.startswith("{")]
    assert probe[0]["check"] == "env" and probe[0]["ok"] and probe[0]["varlen_missing"] is None
    assert probe[-1] == {"check": "stop", "reason": "no CUDA device: the kernel checks need one"}
    tests = (out / "tests.log").read_text()
    assert re.search(r"^=+ (\d+) skipped in ", tests, re.M) and " passed" not in tests and "failed" not in tests
    assert "meshtron-varlen+chunk: skipped: needs CUDA" in (out / "bench.log").read_text()
    assert "gpu_proof: 4 of 4 stages passed or skipped" in proc.stdout


def test_tests_gpu_collects_from_any_cwd(tmp_path):
    """`pytest <checkout>/tests/gpu` from another directory collects every case (they skip without CUDA)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           str(ROOT / "tests" / "gpu")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"^(\d+) tests collected", proc.stdout, re.M), proc.stdout[-2000:]


def test_gpu_proof_refuses_bad_arguments_before_any_stage(tmp_path):
    script = str(ROOT / "bench" / "gpu_proof.py")
    bad = subprocess.run([sys.executable, script, "--dry-run", "--wheels", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--wheels" in bad.stderr and "not a directory" in bad.stderr
    assert not (tmp_path / "o").exists()
    if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode != 0:
        gpu = subprocess.run([sys.executable, script, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                             timeout=60)
        assert gpu.returncode == 2 and "--dry-run" in gpu.stderr and not (tmp_path / "o").exists()


def test_trainer_overhead_smoke():
    """bench/trainer_overhead.py on a minuscule model: both sides measured, the ratio line printed."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trainer_overhead.py"), "--steps", "2", "--warmup", "1",
                           "--rounds", "1", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1",
                           "model.num_attention_heads=2", "model.num_query_groups=1", "data.seq_len=32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rates = dict(re.findall(r"^(trainer|bare)\b.*?: +([\d,]+) tokens/s \(median of 2 steps\)$", proc.stdout, re.M))
    assert set(rates) == {"trainer", "bare"} and all(float(v.replace(",", "")) > 0 for v in rates.values()), proc.stdout
    ratio = re.search(r"^ratio trainer/bare: ([\d.]+) \(goal >= 0\.95\)$", proc.stdout, re.M)
    assert ratio and float(ratio[1]) > 0, proc.stdout


@pytest.mark.extended  # a bench's smoke, not a proof: run it with -m extended when changing bench/scale.py
def test_scale_smoke(tmp_path):
    """bench/scale.py at minuscule sizes: its synthetic corpus is what megatron-core's IndexedDataset reads,
    both tables are measured (per-rank peaks, start-up, wall time) and the ratio lines printed."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    small = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
             "model.num_query_groups=1"]
    args = ["--work", str(tmp_path), "--tokens", "2e4", "--doc-len", "100", "--corpus-ranks", "1", "--shards", "1", "2",
            "--seq-len", "32", "--model-overrides", *small]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ds = IndexedDataset(str(tmp_path / "corpora" / "synthetic_2e04_100"))
    assert len(ds) == 200 and sum(len(ds[i]) for i in range(len(ds))) == 20_000
    assert ds[0].dtype.name == "uint16" and max(int(ds[i].max()) for i in range(len(ds))) < 2048
    corpus = re.search(r"^\| 2e\+04 \| 200 \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert corpus and all(float(v) > 0 for v in corpus.groups()), proc.stdout
    for shards, ranks in ((1, 1), (2, 2)):
        row = re.search(rf"^\| {shards} \| ((?:[\d.]+(?: / )?){{{ranks}}}) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                        proc.stdout, re.M)
        assert row and float(row[2]) > 0.1 and float(row[4]) > 0, proc.stdout
    assert re.search(r"^ratio 2-rank / 1-process peak RSS: [\d.]+ \(goal <= 0\.40\) -> (met|missed)$", proc.stdout,
                     re.M), proc.stdout
    assert (tmp_path / "model_fsdp2" / "run" / "hf" / "model.safetensors").exists()  # the export ran


@pytest.mark.slow
@pytest.mark.extended  # a bench's smoke, not a proof: run it with -m extended when changing bench/lora.py
def test_lora_bench_smoke():
    """bench/lora.py on the small model: every configuration runs and the ratio columns and goal lines print."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lora.py"), "--model", "small", "--ranks", "2",
                           "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^lora-bf16 +[\d,]+ +[\d.]+x +[\d.]+ +[\d.]+x +[\d.]+x", proc.stdout, re.M), proc.stdout
    assert re.search(r"^goal: lora-bf16 peak <= 0.45x full: [\d.]+x -> (met|missed)$", proc.stdout, re.M)
    assert re.search(r"^goal: lora-bf16 tokens/s >= 1.2x full: [\d.]+x -> (met|missed)$", proc.stdout, re.M)


def test_dpo_bench_smoke():
    """bench/dpo.py on the small model: meshtron packed and padded and TRL's DPOTrainer run, the table and the
    goal line print."""
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dpo.py"), "--model", "small", "--steps", "2",
                           "--pairs", "2", "--seq-len", "512"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for side in ("meshtron packed", "meshtron padded", "TRL DPOTrainer"):
        assert side in proc.stdout, proc.stdout[-2000:]
    assert "goal: meshtron packed >= 1.5x TRL's pairs/s:" in proc.stdout
