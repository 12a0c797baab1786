"""DPO throughput side by side in one run (CPU): meshtron with pairs packed, meshtron with one pair per row
(padded), and TRL's DPOTrainer, on the same pairs, the same tiny-but-not-trivial HF model and the same
optimizer; real tokens/s and pairs/s of each, and the ratios.

    .venv/bin/python bench/dpo.py                      # hidden 256, 4 layers, 8 pairs a step, 6 steps
    .venv/bin/python bench/dpo.py --model small --steps 3 --pairs 4   # the CPU smoke of tests/integration

The pairs: the bundled preference set (trainer/assets/preference), only the pairs whose chosen and rejected fit
one row of --seq-len together (so no side truncates and all three train on exactly the same tokens). Each side
precomputes the reference log-probs before its first step (excluded from the timing, as TRL's is). One process,
fp32, the trainer's default CPU threads. Step time is the median over the steps after the first (which
allocates); meshtron's comes from its metrics (real tokens / tokens_per_s), TRL's from a callback.

TRL pads each batch of 2 x pairs sequences to the longest one; meshtron's padded mode pads every pair to the
row length, and its packed mode fills rows with whole pairs (best-fit decreasing), so the same work costs fewer
padded slots. Goal (issue 29): meshtron packed >= 1.5x TRL's pairs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 1.5
SHAPES = {"default": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2),
          "small": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)}
OPTIM = dict(lr=1e-6, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)


def make_model(out: Path, shape: str, seq_len: int) -> None:
    import torch
    import transformers as T

    from trainer.assets import BUNDLED_TOKENIZER

    tok = T.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tok), max_position_embeddings=seq_len, **SHAPES[shape])
    T.LlamaForCausalLM(config).save_pretrained(out)


def fitting_pairs(path: Path, seq_len: int, limit: int, cache: Path) -> list[dict]:
    """The set's pairs (in order, at most ``limit``) whose two sequences fill at most seq_len slots untruncated."""
    from transformers import AutoTokenizer

    from trainer.assets import BUNDLED_TOKENIZER
    from trainer.config import DataConfig, DataSource
    from trainer.data.preference import load_preference_corpus

    from trainer.data.preference import to_pair

    # Explicit prompts throughout (TRL's datasets need one schema per set): an implicit-prompt row's shared
    # leading messages become its prompt, exactly as meshtron reads it.
    rows = []
    for line in path.read_text().splitlines():
        pair = to_pair(json.loads(line))
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    tok = AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    explicit = cache / "explicit.jsonl"
    cache.mkdir(parents=True, exist_ok=True)
    explicit.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_preference_corpus(DataSource(path=str(explicit), format="preference"), tok,
                                    DataConfig(format="preference", seq_len=1 << 20), cache)
    sizes = [len(corpus.doc(2 * i)) + len(corpus.doc(2 * i + 1)) - 2 for i in range(len(rows))]
    return [r for r, n in zip(rows, sizes) if n <= seq_len][:limit]


def run_meshtron(name: str, hf: Path, data: Path, rows: int, packing: bool, args, tmp: Path) -> dict:
    out = tmp / name
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "trainer", f"trainer.output_dir={out}", "model=tiny", f"model.hf_path={hf}",
           "data=preference", f"data.path={data}", f"data.seq_len={args.seq_len}", f"data.packing={str(packing).lower()}",
           "trainer.objective=dpo", "trainer.precision=fp32", f"trainer.max_steps={args.steps}",
           f"trainer.global_batch_size={rows}", f"parallel.microbatch_size={args.microbatch}", "trainer.eval_every=0",
           "logging.wandb=false", "trainer.export_hf=false", "trainer.checkpoint.save_before_export=false",
           "optim.warmup_steps=0", "optim.decay=constant", "optim.weight_decay=0", f"optim.lr={OPTIM['lr']}", "optim.min_lr=0",
           f"optim.beta2={OPTIM['beta2']}", f"optim.eps={OPTIM['eps']}", "trainer.device=cpu"]
    print(f"dpo bench: meshtron {name} ...", flush=True)
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"meshtron {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    seconds = [r["packing_efficiency"] * rows * args.seq_len / r["tokens_per_s"] for r in timed]
    real = [r["packing_efficiency"] * rows * args.seq_len for r in timed]
    step = statistics.median(seconds)
    pairs = statistics.mean(r["pairs"] for r in timed)
    return {"name": f"meshtron {name}", "rows": rows, "pairs_per_step": pairs, "step_s": step,
            "pairs_per_s": pairs / step, "tokens_per_s": statistics.mean(real) / step,
            "padding": 1 - statistics.mean(r["packing_efficiency"] for r in timed), "first_loss": records[0]["loss"]}


def run_trl(hf: Path, pairs: list[dict], args, tmp: Path) -> dict:
    import datasets
    import torch
    import transformers as T
    from trl import DPOConfig, DPOTrainer

    from trainer.assets import BUNDLED_TOKENIZER

    print("dpo bench: TRL DPOTrainer ...", flush=True)
    tok = T.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    model = T.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").float()
    train_args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.pairs, max_steps=args.steps,
                           learning_rate=OPTIM["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           adam_beta1=OPTIM["beta1"], adam_beta2=OPTIM["beta2"], adam_epsilon=OPTIM["eps"],
                           max_grad_norm=OPTIM["grad_clip"], beta=0.1, max_length=None, precompute_ref_log_probs=True,
                           report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                           disable_tqdm=True, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=train_args, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tok)
    times, tokens = [], []

    class Clock(T.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    collate = trainer.data_collator

    slots = []

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()))
        slots.append(batch["attention_mask"].numel())
        return batch

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    trainer.remove_callback(T.PrinterCallback)
    torch.manual_seed(0)
    trainer.train()
    step = statistics.median(times[1:] or times)
    real = statistics.mean(tokens[-len(times):])
    return {"name": "TRL DPOTrainer", "rows": 2 * args.pairs, "pairs_per_step": args.pairs, "step_s": step,
            "pairs_per_s": args.pairs / step, "tokens_per_s": real / step,
            "padding": 1 - sum(tokens[-len(times):]) / sum(slots[-len(times):]),
            "first_loss": float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (TRL's batch, meshtron padded's rows)")
    parser.add_argument("--seq-len", type=int, default=256, help="row length (the bundled set's data.seq_len)")
    parser.add_argument("--microbatch", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args(argv)
    from trainer.assets import asset_path

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf = tmp / "hf"
        make_model(hf, args.model, args.seq_len)
        pairs = fitting_pairs(asset_path("preference", "train.jsonl"), args.seq_len, args.pairs * args.steps * 4,
                              tmp / "scan")
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        # Packed rows holding about --pairs pairs: the pairs' mean slot count over a row, rounded up.
        from trainer.config import DataConfig, DataSource
        from trainer.data.preference import load_preference_corpus
        from trainer.data.row_index import build_rows
        from transformers import AutoTokenizer
        from trainer.assets import BUNDLED_TOKENIZER

        corpus = load_preference_corpus(DataSource(path=str(data), format="preference"),
                                        AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER),
                                        DataConfig(format="preference", seq_len=args.seq_len), tmp / "scan2")
        packed_rows = build_rows(corpus, args.seq_len, None, packing=True).num_rows
        rows = max(1, round(packed_rows * args.pairs / len(pairs)))
        rows += (-rows) % args.microbatch
        results = [run_meshtron("packed", hf, data, rows, True, args, tmp),
                   run_meshtron("padded", hf, data, args.pairs, False, args, tmp),
                   run_trl(hf, pairs, args, tmp)]
    trl = results[-1]
    print(f"\nDPO on CPU: {len(pairs)} pairs of the bundled set (fitting {args.seq_len} tokens), model {args.model}, "
          f"{args.steps} steps, fp32, one process")
    print(f"{'side':<18}{'rows/step':>10}{'pairs/step':>11}{'step s':>9}{'pairs/s':>9}{'tokens/s':>10}{'padding':>9}"
          f"{'x TRL':>7}")
    for r in results:
        print(f"{r['name']:<18}{r['rows']:>10}{r['pairs_per_step']:>11.1f}{r['step_s']:>9.3f}{r['pairs_per_s']:>9.2f}"
              f"{r['tokens_per_s']:>10,.0f}{r['padding']:>9.1%}{r['pairs_per_s'] / trl['pairs_per_s']:>7.2f}")
    packed, padded = results[0], results[1]
    ratio = packed["pairs_per_s"] / trl["pairs_per_s"]
    print(f"packed vs padded: {packed['pairs_per_s'] / padded['pairs_per_s']:.2f}x pairs/s, "
          f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x real tokens/s")
    print(f"goal: meshtron packed >= {GOAL}x TRL's pairs/s: {ratio:.2f}x, {'MET' if ratio >= GOAL else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
