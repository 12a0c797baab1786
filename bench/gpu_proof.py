"""meshtron's one-command GPU check: environment, kernel probe, the tests/gpu cases worth most, the throughput bench.

    python3 bench/gpu_proof.py --out /tmp/proof                        # on a CUDA machine (about 8 minutes)
    python3 bench/gpu_proof.py --out $OUT --wheels .whl                # offline machine: install carried wheels
    python3 bench/gpu_proof.py --dry-run                               # anywhere: what each stage would do, run on CPU

Stages run in order, each in its own subprocess under its own time box, and each writes its log under --out and a
line to --out/summary.jsonl as soon as it ends, so a run cut short keeps every finished stage's results:

1. wheels: installs --wheels (for our lent H100/H200: hydra-core, omegaconf and antlr4, the imports of `python -m
   trainer` its image lacks; it has pytest and pytest-timeout; with a torchao wheel among them, 3.4 MB, the fp8
   stages below run too) into --out/site with pip --target, and puts it and this checkout on PYTHONPATH for the
   stages after it; nvidia-smi records the GPU and driver.
2. probe: bench/gpu_probe.py, first the environment (Python, torch, CUDA, packages), then the kernel facts
   (varlen with GQA and a window, flex, SDPA dispatch, _grouped_mm).
3. tests: tests/gpu, the cases that prove the most per second first (TESTS below), each with its own timeout;
   tests/gpu/test_cuda_fp8.py when torchao is carried.
4. bench: bench/gpu_throughput.py on the Llama-3.2-1B shape at seq 8192: the transformers padded baseline and
   meshtron's packed paths (and the fp8 twin of varlen when torchao is carried), appended to --out/RESULTS.md.

Uses only the standard library itself, so it runs before the wheels are installed. Exit code: 0 when every stage
that ran passed, 1 when one failed or ran out of time, 2 for bad arguments (or no CUDA without --dry-run).
--dry-run prints each stage's time box and command and runs them on the CPU: the probe stops after the
environment, tests/gpu skips every case, the bench runs its CPU smoke of the same configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G = "tests/gpu"
# Most proof per second first: the attention kernels (varlen with GQA on this torch), HF parity, the loss path,
# the step's sync budget, MoE's grouped GEMMs, gradients under checkpointing, then a short training run.
TESTS = [
    f"{G}/test_cuda_attention.py::test_the_fused_kernel_runs_forward_and_backward",
    f"{G}/test_cuda_attention.py::test_sdpa_on_packed_gqa_rows_is_never_the_math_kernel",
    f"{G}/test_cuda.py::test_logits_match_transformers_on_cuda",
    f"{G}/test_cuda_attention.py::test_packed_rows_equal_each_document_alone",
    f"{G}/test_cuda_chunked_loss.py",
    f"{G}/test_cuda_sync_budget.py",
    f"{G}/test_cuda_moe.py",
    f"{G}/test_cuda_attention.py::test_gradients_match_the_dense_reference_with_selective_checkpointing",
    f"{G}/test_cuda_attention.py::test_sdpa_on_one_document_rows_is_flash_eligible",
    f"{G}/test_cuda_attention.py::test_varlen_under_autocast_with_fp32_weights",
    f"{G}/test_cuda.py",
    f"{G}/test_cuda_compile.py",
]
# The transformers padded baseline and meshtron's packed paths, best first (varlen on every supported torch).
BENCH_CONFIGS = ["hf-sdpa-pad", "meshtron-varlen+chunk", "meshtron-flex+chunk"]
# With a torchao wheel among --wheels: the real fp8 step's tests (test_cuda_fp8.py also holds the fp8 twin of
# test_cuda_moe.py's MoE model: its routed experts on fp8 grouped GEMMs, on an H100/H200) and the fp8 twin of the
# best bf16 path (bench/gpu_throughput.py has no MoE configuration to twin).
FP8_TESTS = [f"{G}/test_cuda_fp8.py"]
FP8_BENCH = ["meshtron-varlen+chunk+fp8"]


def carries_torchao(wheels: Path | None) -> bool:
    return wheels is not None and any(wheels.glob("torchao-*.whl"))


class Stages:
    """Runs stages in order under time boxes; records each one's outcome as soon as it ends."""

    def __init__(self, out: Path, dry_run: bool, env: dict):
        self.out, self.dry_run, self.env = out, dry_run, env
        self.start = time.monotonic()
        self.outcomes: dict[str, str] = {}

    def run(self, name: str, argv: list[str], box_s: float, shown: str | None = None) -> int:
        log = self.out / f"{name}.log"
        print(f"=== {name} (time box {box_s:.0f} s, at +{time.monotonic() - self.start:.0f} s): "
              f"{shown or shlex.join(argv)} > {log}", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                code = subprocess.run(argv, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=box_s).returncode
                outcome = "passed" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                code, outcome = 124, f"out of time after {box_s:.0f} s"
        seconds = time.monotonic() - t0
        self.record(name, outcome, seconds, log)
        return code

    def record(self, name: str, outcome: str, seconds: float = 0.0, log: Path | None = None) -> None:
        self.outcomes[name] = outcome
        with open(self.out / "summary.jsonl", "a") as f:
            f.write(json.dumps({"stage": name, "outcome": outcome, "seconds": round(seconds, 1),
                                "dry_run": self.dry_run, "log": str(log) if log else None}) + "\n")
        print(f"--- {name}: {outcome} ({seconds:.0f} s)", flush=True)
        if log is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"    {line}" for line in tail), flush=True)


def install_wheels(stages: Stages, wheels: Path | None, python: str) -> None:
    if wheels is None:
        stages.record("wheels", "skipped (no --wheels: the packages must be installed)")
        return
    found = sorted(wheels.glob("*.whl"))
    if not found:
        stages.record("wheels", f"failed (no *.whl in {wheels})")
        return
    site = stages.out / "site"
    stages.run("wheels", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], 120)
    stages.env["PYTHONPATH"] = os.pathsep.join([str(site), stages.env["PYTHONPATH"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results directory (default $OUT, else /tmp/meshtron-gpu-proof)")
    p.add_argument("--wheels", type=Path, help="a directory of wheels to install for the run (offline machines)")
    p.add_argument("--dry-run", action="store_true", help="print each stage and run it on the CPU")
    p.add_argument("--probe-s", type=float, default=75, help="time box of the kernel probe")
    p.add_argument("--tests-s", type=float, default=210, help="time box of tests/gpu")
    p.add_argument("--test-timeout-s", type=float, default=120, help="timeout of one test (pytest-timeout)")
    p.add_argument("--bench-s", type=float, default=170, help="time box of the throughput bench")
    p.add_argument("--config-s", type=float, default=65, help="time box of one bench configuration")
    p.add_argument("--skip", nargs="+", default=[], choices=["probe", "tests", "bench"], help="stages to leave out")
    args = p.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        p.exit(2, f"gpu_proof: --wheels {args.wheels} is not a directory of .whl files\n")
    if not args.dry_run and shutil.which("nvidia-smi") is None:
        p.exit(2, "gpu_proof: no nvidia-smi, so no NVIDIA GPU here; run with --dry-run to see and smoke-test the "
                  "stages\n")
    out = args.out or Path(os.environ.get("OUT") or "/tmp/meshtron-gpu-proof")
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                        else []))}
    stages = Stages(out, args.dry_run, env)
    print(f"gpu_proof: results under {out}" + (" (dry run on the CPU)" if args.dry_run else ""), flush=True)

    install_wheels(stages, args.wheels, python)
    if not args.dry_run and shutil.which("nvidia-smi"):
        stages.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], 30)
    if "probe" not in args.skip:
        stages.run("probe", [python, "bench/gpu_probe.py"], args.probe_s)
    if "tests" not in args.skip:
        timeout = [f"--timeout={args.test_timeout_s:.0f}"] if has_pytest_timeout(python, env) else []
        # Exit 5 (nothing collected) cannot happen here: the dry run collects the cases and skips them.
        stages.run("tests", [python, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", *timeout,
                             f"--junitxml={out / 'junit.xml'}", *TESTS,
                             *(FP8_TESTS if carries_torchao(args.wheels) else [])], args.tests_s)
    if "bench" not in args.skip:
        # The bench writes its table at the end: no configuration may start later than one configuration's
        # timeout before the stage's box closes, or a cut-short stage would lose the ones that ran.
        per_config = min(args.config_s, args.bench_s / 2)
        configs = BENCH_CONFIGS + (FP8_BENCH if carries_torchao(args.wheels) else [])
        bench = [python, "bench/gpu_throughput.py", "--configs", *configs, "--config-timeout",
                 f"{per_config:.0f}", "--time-limit", f"{max(args.bench_s - per_config - 15, 1):.0f}"]
        bench += (["--device", "cpu", "--warmup", "1", "--steps", "1"] if args.dry_run
                  else ["--warmup", "2", "--steps", "5", "--append-results", str(out / "RESULTS.md")])
        stages.run("bench", bench, args.bench_s)

    failed = {n: o for n, o in stages.outcomes.items() if not (o.startswith("passed") or o.startswith("skipped"))}
    print(f"gpu_proof: {len(stages.outcomes) - len(failed)} of {len(stages.outcomes)} stages passed or skipped"
          + (f"; not passed: {', '.join(failed)}" if failed else "") + f" ({time.monotonic() - stages.start:.0f} s)",
          flush=True)
    return 1 if failed else 0


def has_pytest_timeout(python: str, env: dict) -> bool:
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('pytest_timeout') else 1)"
    return subprocess.run([python, "-c", code], env=env, cwd=ROOT).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
