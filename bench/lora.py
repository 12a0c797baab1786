"""LoRA against full fine-tuning, side by side in one run: peak memory per rank and tokens/s of a ~150M model on
4 FSDP ranks (CPU, gloo), each configuration `torchrun -m trainer` as a user runs it.

    .venv/bin/python bench/lora.py                        # full, lora (fp32 base), lora (bf16 base), QLoRA (NF4)
    .venv/bin/python bench/lora.py --steps 6 --configs full lora-bf16

The model: Llama-style, hidden 768, 12 layers, 12 heads (4 query groups), SwiGLU 2048, vocabulary 32000
untied: 124.7M parameters. Every configuration: trainer.precision=bf16 (autocast; FSDP's bf16 parameters),
parallel=fsdp over 4 ranks, sequences of 256 tokens, 8 per step, the bundled corpus, no export or checkpoint.
LoRA: rank 16 on every linear layer; lora-nf4 is QLoRA, the decoder's linear weights stored as torchao's NF4
(4-bit, quantized whole and sharded by rows over the FSDP ranks), the rest of the base bf16. Peak memory is rank
0's resident set at its last logged step (the trainer's mem_gib on a CPU: ru_maxrss); it includes what a process
holds before any model exists (torch, the trainer's imports, gloo), measured here too and printed, so the ratio
above that floor is shown beside the raw one. tokens/s is the median of the steps after the first (the first
allocates). The NF4 base's loss gap to the bf16 base's (same data, same adapters' initialisation) is printed per
step, relative.

Goals (issue 28): LoRA with a bf16 base at most 0.45x full fine-tuning's per-rank peak; tokens/s at least 1.2x
full. On a CPU the time goes to the base's matmuls either way (LoRA saves the weight-gradient GEMMs and the
optimizer step over the base: a third of the matmul FLOPs), so the speed-up is that of the FLOPs saved.
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.hidden_size=768", "model.num_layers=12", "model.num_attention_heads=12", "model.num_query_groups=4",
         "model.ffn_hidden_size=2048", "model.vocab_size=32000", "model.max_position_embeddings=2048",
         "model.tie_word_embeddings=false"]
RUN = ["data.seq_len=256", "trainer.global_batch_size=8", "parallel.microbatch_size=2", "parallel=fsdp",
       "trainer.precision=bf16", "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false",
       "trainer.checkpoint.save_before_export=false", "optim.warmup_steps=0"]
# --model small: the CPU smoke of tests/integration/test_benches.py; hidden 256 and SwiGLU 512 are the smallest
# widths whose linear weights split into whole NF4 blocks and scale blocks over 2 and 4 FSDP ranks.
SMALL = ["model.hidden_size=256", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=512", "model.vocab_size=2048", "model.max_position_embeddings=2048"]
LORA = ["model.lora.rank=16", "model.lora.alpha=32"]
CONFIGS = {
    "full": [],
    "lora": LORA,
    "lora-bf16": [*LORA, "model.lora.base_dtype=bf16"],
    "lora-nf4": [*LORA, "model.lora.base_dtype=bf16", "model.lora.base_quant=nf4"],
}
GOALS = {"memory": 0.45, "speed": 1.2}


def run_config(name: str, args, tmp: Path) -> dict:
    out = tmp / name
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
           "-m", "trainer", f"trainer.output_dir={out}", f"trainer.max_steps={args.steps}",
           *(SMALL if args.model == "small" else MODEL), *RUN,
           *CONFIGS[name]]
    print(f"lora bench: {name} ...", flush=True)
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainable = next((line for line in done.stdout.splitlines() if line.startswith("meshtron: ")), "")
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "peak_gib": max(r["mem_gib"] for r in rows), "loss": rows[-1]["loss"], "losses": [r["loss"] for r in rows],
            "size": trainable.split("(", 1)[1].split(")", 1)[0] if "(" in trainable else ""}


def import_floor() -> float:
    """GiB resident in a process that imported what a training rank imports, before any model or data."""
    code = ("import resource, torch, torch.distributed, trainer.loop, parallel.parallelize; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=5, help="steps per configuration (the first is not timed)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per configuration")
    p.add_argument("--model", choices=("150m", "small"), default="150m", help="small: a smoke test of the script")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps {args.steps}: at least 2 (the first step is not timed)")
    with tempfile.TemporaryDirectory(prefix="meshtron-lora-bench-") as d:
        results = {name: run_config(name, args, Path(d)) for name in args.configs}
    floor = import_floor()
    full = results.get("full", {})
    print(f"\nper-process floor (imports only): {floor:.2f} GiB")
    print(f"{'config':<10} {'tokens/s':>10} {'vs full':>8} {'peak GiB/rank':>14} {'vs full':>8} "
          f"{'above floor vs full':>20} {'loss':>7}  size")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} failed: {r['error']}")
            continue
        speed = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x" if "tokens_per_s" in full else "-"
        mem = f"{r['peak_gib'] / full['peak_gib']:.2f}x" if "peak_gib" in full else "-"
        above = f"{(r['peak_gib'] - floor) / (full['peak_gib'] - floor):.2f}x" if "peak_gib" in full else "-"
        print(f"{name:<10} {r['tokens_per_s']:>10,.0f} {speed:>8} {r['peak_gib']:>14.2f} {mem:>8} {above:>20} "
              f"{r['loss']:>7.3f}  {r['size']}")
    lora = results.get("lora-bf16", {})
    if "peak_gib" in lora and "peak_gib" in full:
        m, s = lora["peak_gib"] / full["peak_gib"], lora["tokens_per_s"] / full["tokens_per_s"]
        print(f"goal: lora-bf16 peak <= {GOALS['memory']}x full: {m:.2f}x -> {'met' if m <= GOALS['memory'] else 'missed'}")
        print(f"goal: lora-bf16 tokens/s >= {GOALS['speed']}x full: {s:.2f}x -> {'met' if s >= GOALS['speed'] else 'missed'}")
    nf4 = results.get("lora-nf4", {})
    if "losses" in nf4 and "losses" in lora:
        gaps = [a / b - 1 for a, b in zip(nf4["losses"], lora["losses"])]
        print(f"lora-nf4 vs lora-bf16: peak {nf4['peak_gib'] / lora['peak_gib']:.2f}x, tokens/s "
              f"{nf4['tokens_per_s'] / lora['tokens_per_s']:.2f}x, loss gap per step (relative) "
              + " ".join(f"{g:+.1e}" for g in gaps) + f", largest {max(abs(g) for g in gaps):.1e}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
