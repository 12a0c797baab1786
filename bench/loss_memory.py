"""Peak host memory (RSS) of one training step with the loss chunked (trainer.loss_chunk_size, default 1024)
and unchunked (0), each in a fresh process, side by side.

    .venv/bin/python bench/loss_memory.py [--seq 4096] [--chunk 1024] [--no-adamw] [--limit-gib 12] [overrides]

The model is the 2-layer, hidden-256 decoder at Llama 3's vocabulary (128256), built by
parallel.parallelize.build_parallel_model from the Hydra config (so the chunk size reaches it the way it
does in training), one sequence of --seq random tokens, forward + backward + an AdamW step, on CPU. Unchunked,
every [tokens, vocab] fp32 tensor of the loss (logits, log-softmax, their gradients) is seq x 128256 x 4 bytes
(2.1 GB at seq 4096); chunked, they exist for one chunk at a time. Each child caps its own address space
(--limit-gib) so a run that grows too far fails with an allocation error instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.vocab_size=128256", "model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_layers=2",
         "model.num_attention_heads=4", "model.num_query_groups=2"]


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(seq: int, adamw: bool, overrides: list[str]) -> None:
    """One step; prints a JSON line with the peak RSS after set-up and after the step."""
    import torch
    from hydra import compose, initialize_config_module

    from parallel.dims import ParallelDims
    from parallel.parallelize import build_parallel_model
    from trainer.config_io import to_config
    from trainer.loss import count_valid

    torch.set_num_threads(1)  # the machine is shared; memory, not speed, is measured
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = to_config(compose("config", overrides=[*MODEL, f"model.max_position_embeddings={seq}",
                                                      f"data.seq_len={seq}", *overrides]))
    pm = build_parallel_model(cfg, ParallelDims.from_config(cfg.parallel, 1), None, torch.device("cpu"))
    model = pm.modules[0]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq), generator=gen)
    labels = torch.randint(0, cfg.model.vocab_size, (1, seq), generator=gen)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4) if adamw else None
    setup = _peak_rss()
    losses = model(tokens, labels=labels)
    loss = losses.sum() / count_valid(labels)
    loss.backward()
    if opt is not None:
        opt.step()
    print(json.dumps({"chunk": model.loss_chunk_size, "loss": loss.item(), "setup": setup, "peak": _peak_rss(),
                      "params": sum(p.numel() for p in pm.parameters())}))


def run(chunk: int, args: argparse.Namespace, extra: list[str]) -> dict:
    limit = int(args.limit_gib * 2**30)
    cmd = [sys.executable, __file__, "--child", f"--seq={args.seq}", *([] if args.adamw else ["--no-adamw"]),
           *extra, f"trainer.loss_chunk_size={chunk}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def cap() -> None:  # in the child, before it imports anything
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=cap, timeout=1800)
    if proc.returncode != 0:
        return {"chunk": chunk, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024, help="the chunked run's trainer.loss_chunk_size")
    parser.add_argument("--no-adamw", dest="adamw", action="store_false", help="forward + backward only")
    parser.add_argument("--limit-gib", type=float, default=12.0, help="address-space cap of each child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.child:
        child(args.seq, args.adamw, extra)
        return
    whole, chunked = run(0, args, extra), run(args.chunk, args, extra)
    vocab_tensor = args.seq * 128256 * 4
    print(f"one step, seq {args.seq}, vocab 128256, {'AdamW' if args.adamw else 'no optimizer step'}; "
          f"one [tokens, vocab] fp32 tensor = {_gib(vocab_tensor)}, one chunk's = "
          f"{_gib(vocab_tensor * min(args.chunk, args.seq) / args.seq)}")
    print(f"{'loss_chunk_size':<16} {'set-up RSS':>12} {'peak RSS':>12} {'step adds':>12} {'loss':>10}")
    for r in (whole, chunked):
        if "error" in r:
            print(f"{r['chunk']:<16} failed: {r['error']}")
        else:
            print(f"{r['chunk']:<16} {_gib(r['setup']):>12} {_gib(r['peak']):>12} "
                  f"{_gib(r['peak'] - r['setup']):>12} {r['loss']:>10.4f}")
    if "error" not in whole and "error" not in chunked:
        print(f"peak RSS ratio chunked / unchunked: {chunked['peak'] / whole['peak']:.2f} (goal <= 0.40); "
              f"what the step adds: {(chunked['peak'] - chunked['setup']) / (whole['peak'] - whole['setup']):.2f}")


if __name__ == "__main__":
    main()
