"""Tokens/s of each parallel preset against one process, same model and global batch, in one run.

    .venv/bin/python bench/parallel_overhead.py [--steps 12] [--presets fsdp tp2 ...] [extra overrides]

Every run trains the embedded tiny default (or what the overrides say) from the same seed; the table gives
each layout's median tokens/s over its steps after the first two (warm-up), and its ratio to the
single-process run measured in the same invocation. On a CPU box the ranks share the cores, so ratios
below 1 measure communication and scheduling overhead, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# preset -> processes it runs on
PRESETS = {"fsdp": 2, "hsdp": 4, "tp2": 2, "tp2_pp2": 4, "tp2_cp2": 4, "pp2_interleaved": 2,
           "pp2_fsdp2_tp2": 8, "4d_16ranks": 16}


def run(preset: str, nproc: int, steps: int, extra: list[str], tmp: Path) -> float:
    out = tmp / preset
    args = [f"parallel={preset}", f"trainer.output_dir={out}", f"trainer.max_steps={steps}",
            "trainer.eval_every=0", "trainer.export_hf=false", "logging.wandb=false", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
               "-m", "trainer", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{preset} failed:\n{proc.stderr[-4000:]}")
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[2:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="meshtron-bench-") as tmp:
        base = run("single", 1, args.steps, extra, Path(tmp))
        print(f"{'preset':<18} {'ranks':>5} {'tokens/s':>12} {'vs single':>10}")
        print(f"{'single':<18} {1:>5} {base:>12,.0f} {1.0:>10.2f}")
        for preset in args.presets:
            rate = run(preset, PRESETS[preset], args.steps, extra, Path(tmp))
            print(f"{preset:<18} {PRESETS[preset]:>5} {rate:>12,.0f} {rate / base:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
