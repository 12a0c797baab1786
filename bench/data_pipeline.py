"""Packing efficiency and loader throughput on a realistic length mix, as ratios, in one run.

    .venv/bin/python bench/data_pipeline.py [--seq-len 2048] [--docs 20000] [--trainer-tokens-per-s 4e5]

Synthetic token corpora with long-tailed (lognormal) lengths: SFT-like conversations (median ~350 tokens,
a tail past seq_len) and pretraining-like documents (median ~600). For each it prints the packing
efficiency of BFD / concatenate-and-chunk against naive next-fit and one-sample-per-row, then the loader's
tokens/s (prefetch off and on) as a ratio to a simulated trainer consumption rate: a ratio well above 1
means the data path never stalls the step. With prefetch on, it also runs the loop with the trainer's step
time simulated by a sleep and reports the fraction of wall time spent waiting for data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.corpus import TokenizedCorpus  # noqa: E402
from trainer.data.loader import GlobalBatchLoader  # noqa: E402
from trainer.data.packing import pack_corpus  # noqa: E402


def synthetic(n_docs: int, median: float, sigma: float, sft: bool, seed: int) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(8, rng.lognormal(np.log(median), sigma, n_docs)).astype(np.int64)
    tokens = rng.integers(0, 128_000, int(lengths.sum())).astype(np.uint32)
    targets = None
    if sft:  # prompt (first ~40%) untrained, answer trained
        pos = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        targets = pos >= np.repeat((lengths * 0.4).astype(np.int64), lengths)
    return TokenizedCorpus("sft" if sft else "pretrain", tokens, np.cumsum(np.r_[0, lengths]), targets)


def next_fit_efficiency(sizes: np.ndarray, seq_len: int) -> float:
    rows, used = 1, 0
    for s in sizes.tolist():
        if used + s > seq_len:
            rows, used = rows + 1, 0
        used += s
    return float(sizes.sum()) / (rows * seq_len)


def loader_tokens_per_s(rows, batch: int, prefetch: int, steps: int) -> float:
    with GlobalBatchLoader(rows, batch, seed=0, prefetch=prefetch) as loader:
        next(loader)  # thread start and first epoch order
        t = time.perf_counter()
        for _ in range(steps):
            next(loader)
        return steps * batch * rows.seq_len / (time.perf_counter() - t)


def stall_fraction(rows, batch: int, steps: int, trainer_tps: float) -> float:
    step_s = batch * rows.seq_len / trainer_tps
    waited = 0.0
    with GlobalBatchLoader(rows, batch, seed=0, prefetch=4) as loader:
        next(loader)
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            next(loader)
            waited += time.perf_counter() - t
            time.sleep(step_s)  # the trainer's forward/backward
        return waited / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trainer-tokens-per-s", type=float, default=4e5,
                    help="simulated global consumption (default: ~8 H100s on a 7B model)")
    args = ap.parse_args()
    S = args.seq_len

    print(f"seq_len={S}, {args.docs} samples per corpus, global batch {args.global_batch} rows")
    print(f"{'corpus':10} {'packing':22} {'rows':>7} {'efficiency':>10} {'pack s':>7}  notes")
    packed = {}
    for name, median, sigma, sft in (("sft", 350, 1.0, True), ("pretrain", 600, 1.2, False)):
        c = synthetic(args.docs, median, sigma, sft, seed=0)
        t = time.perf_counter()
        rows = pack_corpus(c, S, None if sft else 2, packing=True, overlong="truncate")
        pack_s = time.perf_counter() - t
        packed[name] = rows
        rule = "best-fit decreasing" if sft else "concatenate-and-chunk"
        print(f"{name:10} {rule:22} {rows.num_rows:7d} {rows.efficiency:10.2%} {pack_s:7.2f}  "
              f"truncated={rows.truncated}")
        if sft:
            sizes = np.minimum(np.diff(c.offsets), S + 1) - 1
            print(f"{'':10} {'next-fit (in order)':22} {'':7} {next_fit_efficiency(sizes, S):10.2%}")
        alone = pack_corpus(c, S, None if sft else 2, packing=False, overlong="truncate")
        print(f"{'':10} {'none (one per row)':22} {alone.num_rows:7d} {alone.efficiency:10.2%}")

    print(f"\nloader throughput vs simulated trainer at {args.trainer_tokens_per_s:,.0f} tokens/s")
    for name, rows in packed.items():
        for prefetch in (0, 2):
            tps = loader_tokens_per_s(rows, args.global_batch, prefetch, args.steps)
            print(f"{name:10} prefetch={prefetch}  {tps:14,.0f} tokens/s  ratio {tps / args.trainer_tokens_per_s:7.1f}x")
        stall = stall_fraction(rows, args.global_batch, min(args.steps, 10), args.trainer_tokens_per_s)
        print(f"{name:10} prefetch=4 with simulated steps: {stall:.2%} of wall time waiting for data")


if __name__ == "__main__":
    main()
