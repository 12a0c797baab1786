"""Tokens/s of an MoE model against the dense model of the same active parameters, side by side in one run.

    .venv/bin/python bench/moe.py                          # CPU: hidden 256, 4 layers, 8 experts, top-2
    .venv/bin/python bench/moe.py --device cuda            # a GPU: hidden 1024, 8 layers, seq 2048
    .venv/bin/python bench/moe.py --precisions bf16 --configs dense moe-grouped --steps 20 --shared 256

Both models share hidden size, layers, attention, vocabulary, seed and data; the dense model's SwiGLU is
--ffn wide and every MoE layer routes each token to --topk of --experts experts of width (--ffn - --shared)
/ --topk (plus a shared expert of width --shared when given), so a token goes through the same matmul
weights in both but for the router's (E x hidden per layer): the table prints total and active counts
(trainer.loop.cfg_param_count, trainer/flops.py's matmul_params_per_token, the MFU count) to show it.
The MoE runs twice: expert GEMMs as torch._grouped_mm (moe-grouped; the "path" column says "loop" where
the device and dtype cannot run it) and as a loop over experts (moe-loop, model.moe.moe_grouped_gemm=false).

Each configuration is the trainer's own step, as bench/gpu_throughput.py drives it: trainer.loop.prepare,
parallel.parallelize.build_parallel_model on one process, trainer.optim.StageOptimizers (AdamW),
trainer.step.forward_backward (which adds the MoE auxiliary loss), clip_grad_norm_, the optimizer step and
one loss read-back per step. Precisions: fp32, and bf16 (autocast over fp32 weights, trainer.precision=bf16).
Every model is built and warmed up (--warmup steps, untimed) first; then the configurations take turns, one
timed step each, --steps times, so a change in machine load hits all of them alike; a step is timed between
device syncs and the median step is reported. Data: random tokens, one document per row (plain causal
attention), --rows rows of --seq tokens per step in micro-batches of --micro. The router starts near uniform
(init_std 0.02), so expert load is balanced: the loop's best case and the grouped GEMM's usual one.

On a CPU the ratio measures the routing overhead (router, sort, gathers, aux loss) against the same matmul
FLOPs; GPU figures go with the GPU proof issue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ("dense", "moe-grouped", "moe-loop")
PRECISIONS = ("fp32", "bf16")
# Per device: hidden, layers, heads, query groups, dense ffn, experts, top-k, seq, rows, micro-batch, vocab
SIZES = {
    "cpu": dict(hidden=256, layers=4, heads=8, groups=4, ffn=1024, experts=8, topk=2, seq=256, rows=4, micro=2,
                vocab=4096),
    "cuda": dict(hidden=1024, layers=8, heads=16, groups=4, ffn=4096, experts=8, topk=2, seq=2048, rows=8,
                 micro=2, vocab=32768),
}


def run_config(args, name: str, precision: str):
    """The trainer's Config of one configuration, checked by the trainer's own set-up checks."""
    from trainer.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainerConfig
    from trainer.loop import prepare
    from trainer.moe_config import MoEConfig

    moe = MoEConfig()
    if name != "dense":
        moe = MoEConfig(num_moe_experts=args.experts, moe_router_topk=args.topk,
                        moe_ffn_hidden_size=(args.ffn - args.shared) // args.topk,
                        moe_shared_expert_intermediate_size=args.shared or None,
                        moe_grouped_gemm=name == "moe-grouped")
    model = ModelConfig(name=name, vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                        num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.groups,
                        max_position_embeddings=args.seq, init_std=0.02, moe=moe)
    cfg = Config(model=model, parallel=ParallelConfig(microbatch_size=args.micro),
                 data=DataConfig(seq_len=args.seq),
                 optim=OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, decay="constant"),
                 trainer=TrainerConfig(precision=precision, device=args.device, global_batch_size=args.rows,
                                       eval_every=0, max_steps=args.warmup + args.steps,
                                       export_hf=False, seed=args.seed))
    return prepare(cfg, world_size=1)


class Side:
    """One configuration's model, optimizer and step; rates collects its timed steps' tokens/s."""

    def __init__(self, args, name: str, precision: str, device: torch.device):
        from parallel.collectives import clip_grad_norm_
        from parallel.parallelize import build_parallel_model
        from trainer.flops import matmul_params_per_token
        from trainer.loop import cfg_param_count
        from trainer.loss import count_valid
        from trainer.model.moe import grouped_mm_usable
        from trainer.optim import StageOptimizers
        from trainer.step import forward_backward, local_batch

        cfg, dims = run_config(args, name, precision)
        self.name, self.precision, self.device, self.rates = name, precision, device, []
        self.total, self.active = cfg_param_count(cfg), matmul_params_per_token(cfg.model)
        m = cfg.model.moe
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.path = "-" if not m.enabled else (
            "grouped" if m.moe_grouped_gemm and grouped_mm_usable(device, dtype, args.hidden, m.expert_ffn(args.ffn))
            else "loop")
        pm = build_parallel_model(cfg, dims, None, device)
        opt = StageOptimizers(pm.modules, cfg.optim, device, cfg.trainer.max_steps)

        def step(batch: dict[str, torch.Tensor]) -> float:
            normalizer = count_valid(batch["labels"])
            loss_sum = forward_backward(pm, local_batch(batch, pm), normalizer, cfg, device)
            clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip, pm.mesh, pm.duplicates)
            opt.step()
            opt.zero_grad()
            return float(loss_sum) / normalizer  # the step's one read-back, as the trainer's

        self.step = step

    def timed(self, batch: dict[str, torch.Tensor]) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(batch)
        sync(self.device)
        self.rates.append(batch["input_ids"].numel() / (time.perf_counter() - t0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(args, n: int) -> list[dict[str, torch.Tensor]]:
    """Random tokens; labels are the next token of the row (the last one has none)."""
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.rows, args.seq + 1), generator=g)
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        out.append({k: v.pin_memory() for k, v in batch.items()} if args.device == "cuda" else batch)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=list(SIZES))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration, taken in turns")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration, first")
    parser.add_argument("--shared", type=int, default=0, help="shared-expert width, taken from the routed width")
    parser.add_argument("--seed", type=int, default=1234)
    for key in SIZES["cpu"]:
        parser.add_argument(f"--{key}", type=int, default=None, help="default: by --device")
    args = parser.parse_args()
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.ffn - args.shared) % args.topk or args.shared >= args.ffn:
        raise SystemExit(f"--ffn {args.ffn} minus --shared {args.shared} must be a positive multiple of "
                         f"--topk {args.topk} (the routed experts' width x top-k plus the shared width = --ffn)")
    return args


def main() -> None:
    from trainer.loop import pick_device

    args = parse_args()
    device = pick_device(args.device)
    data = batches(args, args.warmup + args.steps)
    shared = f" + shared {args.shared}" if args.shared else ""
    print(f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.groups} groups, vocab {args.vocab}; "
          f"dense ffn {args.ffn} vs {args.experts} experts x top-{args.topk} of width "
          f"{(args.ffn - args.shared) // args.topk}{shared}; {args.rows} rows x seq {args.seq} per step "
          f"(micro-batches of {args.micro}) on {args.device}, {torch.get_num_threads()} threads; "
          f"{args.steps} timed steps per configuration (+{args.warmup} warm-up)", flush=True)
    sides = []
    for precision in args.precisions:
        for name in args.configs:
            side = Side(args, name, precision, device)
            for batch in data[:args.warmup]:
                side.step(batch)
            sides.append(side)
    for batch in data[args.warmup:]:
        for side in sides:
            side.timed(batch)
    dense = {s.precision: statistics.median(s.rates) for s in sides if s.name == "dense"}
    print(f"\n{'config':<12} {'precision':<9} {'path':<8} {'total params':>13} {'active/token':>13} "
          f"{'tokens/s':>10} {'vs dense':>9}")
    for s in sides:
        rate = statistics.median(s.rates)
        ratio = f"{rate / dense[s.precision]:.2f}" if s.precision in dense else "-"
        print(f"{s.name:<12} {s.precision:<9} {s.path:<8} {s.total:>13,} {s.active:>13,} {rate:>10,.0f} {ratio:>9}")
    print("(active/token: matmul weights a token goes through, output layer included: trainer/flops.py's MFU count; "
          "tokens/s: median step)")


if __name__ == "__main__":
    main()
