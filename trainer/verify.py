"""``torchrun --nproc_per_node N -m trainer.verify [the same overrides as training]``

Checks that *your* parallel layout computes what a single process computes, before you spend GPU hours on
it. It shrinks your model to a tiny copy with the same structure (family, GQA ratio, tied embeddings, qkv
bias, qk-norm, sliding window; for MoE the routing, shared expert and dense/MoE layer pattern) and sizes
that still satisfy your mesh, trains it for `verify.steps` steps with your parallel config and data, then
rank 0 trains the same tiny model on one process, and compares: the loss at every step (relative
difference, at most `verify.tolerance`) and the final parameters (absolute difference, at most
10 x `verify.tolerance`: Adam turns float noise in near-zero gradients into slightly larger parameter
noise). Prints each of the two against its bound; exits 1 above either, keeping both runs to look at (an OK run
removes them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from parallel.dims import ParallelDims
from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.config_io import HYDRA_MAIN, to_config
from trainer.errors import ConfigError
from trainer.distributed import RankInfo, broadcast_str, rank_info
from trainer.entry import exit_config_error, run_hydra
from trainer.moe_config import MoEConfig

HEAD_DIM = 16


def shrink_model(m: ModelConfig, dims: ParallelDims, virtual_stages: int) -> ModelConfig:
    """A tiny model with the user's structure whose sizes divide by the user's mesh."""
    heads_per_group = min(m.num_attention_heads // m.num_query_groups, 4)
    groups = dims.tp  # one query group per tensor-parallel rank
    heads = groups * heads_per_group
    hidden = 64  # independent of heads x head_dim: kv_channels is set explicitly
    ffn = dims.tp * math.ceil(2 * hidden / dims.tp)
    layers = dims.pp * virtual_stages * (1 if dims.pp > 1 else 2)
    return dataclasses.replace(
        m, name=f"{m.name}-verify", hf_path=None, hidden_size=hidden, ffn_hidden_size=ffn,
        num_layers=layers, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=HEAD_DIM, init_std=0.02,
        sliding_window=(8 if m.sliding_window else None),
        moe=shrink_moe(m.moe, layers, dims, hidden),
    )


def shrink_moe(moe: MoEConfig, num_layers: int, dims: ParallelDims, hidden: int) -> MoEConfig:
    """The user's MoE structure (top-k > 1 or not, shared expert and its gate, dense layers among MoE ones,
    routing, capacity, losses) at a tiny size: top-k at most 2, at most 4 experts but at least one more than
    top-k where the user's model has more (so routing still chooses), rounded up to a multiple of the
    expert-parallel degree; experts
    half the dense width (unless the user's use the dense width, as Mixtral's do); moe_layer_freq cut to
    num_layers with at least one MoE layer, and a dense one too where the user's model has one."""
    if not moe.enabled:
        return moe
    E, k = moe.num_moe_experts, moe.moe_router_topk
    topk = min(k, 2)
    experts = min(E, max(4, topk + 1))
    ep = dims.ep  # experts divide evenly over the expert-parallel ranks, as the user's do
    experts = ep * math.ceil(experts / ep)
    width = dims.tp * math.ceil(hidden // 2 / dims.tp)
    return dataclasses.replace(
        moe, num_moe_experts=experts, moe_router_topk=topk,
        moe_ffn_hidden_size=width if moe.moe_ffn_hidden_size is not None else None,
        moe_shared_expert_intermediate_size=2 * width if moe.moe_shared_expert_intermediate_size else None,
        moe_layer_freq=_shrink_layer_freq(moe.moe_layer_freq, num_layers),
    )


def _shrink_layer_freq(freq: Optional[list[int]], num_layers: int) -> Optional[list[int]]:
    """The first num_layers entries of the user's pattern (keeps "first k dense" and periodic patterns), with
    the last layer made MoE if none is, and the first made dense if the user's model has a dense layer and
    the cut lost it (with two layers or more)."""
    if freq is None:
        return None
    small = [int(f) for f in list(freq)[:num_layers]]
    small += [1] * (num_layers - len(small))
    if 1 not in small:
        small[-1] = 1
    if 0 in freq and 0 not in small and num_layers > 1:
        small[0] = 0
    return small


def shrink(cfg: Config, dims: ParallelDims, tokenizer_len: int, out: Path) -> Config:
    seq_multiple = dims.seq_multiple
    seq_len = seq_multiple * max(1, 32 // seq_multiple)
    model = dataclasses.replace(shrink_model(cfg.model, dims, cfg.parallel.pp_virtual_stages),
                                vocab_size=tokenizer_len, max_position_embeddings=max(seq_len, 64))
    micro = max(2, dims.pp)  # enough micro-batches for every schedule
    return dataclasses.replace(
        cfg, model=model,
        data=dataclasses.replace(cfg.data, seq_len=seq_len),
        parallel=dataclasses.replace(cfg.parallel, microbatch_size=1),
        optim=dataclasses.replace(cfg.optim, lr=1e-3, min_lr=1e-4, warmup_steps=0),
        trainer=dataclasses.replace(cfg.trainer, max_steps=cfg.verify.steps, global_batch_size=dims.dp * micro,
                                    eval_every=0, export_hf=True, precision="fp32", output_dir=str(out)),
        logging=dataclasses.replace(cfg.logging, wandb=False),
    )


def compare(parallel: Path, single: Path) -> tuple[list[tuple[int, float, float, float]], float]:
    """Per-step (step, parallel loss, single loss, relative diff) and the largest parameter difference."""
    from safetensors.torch import load_file

    def losses(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    rows = [(a["step"], a["loss"], b["loss"], abs(a["loss"] - b["loss"]) / abs(b["loss"]))
            for a, b in zip(losses(parallel), losses(single))]
    pa = load_file(str(parallel / "hf" / "model.safetensors"))
    pb = load_file(str(single / "hf" / "model.safetensors"))
    if pa.keys() != pb.keys():
        raise AssertionError(f"parameter names differ: {sorted(pa.keys() ^ pb.keys())}")
    worst = max(float((pa[k] - pb[k]).abs().max()) for k in pa)
    return rows, worst


def verdict(max_rel: float, worst: float, tolerance: float) -> tuple[list[str], bool]:
    """The lines that decide the verdict, each comparison against its own bound, and the verdict they give."""
    checks = [("max relative loss difference", max_rel, tolerance, "verify.tolerance"),
              ("max parameter difference", worst, 10 * tolerance, "10 x verify.tolerance")]
    lines = [f"{name} {value:.2e}: {'ok' if value <= bound else 'TOO LARGE'} (at most {bound:.1e}, {what})"
             for name, value, bound, what in checks]
    return lines, all(value <= bound for _, value, bound, _ in checks)


def run(cfg: Config) -> int:
    from trainer.data.tokenizer import load_tokenizer
    from trainer.loop import prepare, train

    info = rank_info()
    cfg, dims = prepare(cfg, info.world_size)  # the user's own config must be valid as it stands
    if dims.is_single:
        raise ConfigError("trainer.verify compares a parallel layout with one process: launch it with torchrun "
                          "and the parallel config to check, e.g. torchrun --nproc_per_node 4 -m trainer.verify "
                          "parallel=tp2_pp2")
    tokenizer_len = len(load_tokenizer(cfg.data, cfg.model.hf_path))
    base = Path(tempfile.mkdtemp(prefix="meshtron-verify-")) if info.is_main else Path()
    small = shrink(cfg, dims, tokenizer_len, base / "parallel")
    train(small)  # starts the process group
    base = Path(broadcast_str(str(base)))
    # All ranks leave the process group together, before rank 0 alone trains the single-process copy: a gloo
    # group torn down while its peer still waits in a collective (the old final broadcast of the verdict, for
    # the whole single run) could abort rank 0 at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    status = 0
    if info.is_main:
        single_cfg = dataclasses.replace(small, parallel=ParallelConfig(microbatch_size=1),
                                         trainer=dataclasses.replace(small.trainer, output_dir=str(base / "single")))
        train(single_cfg, info=RankInfo(0, 1, 0))
        rows, worst = compare(base / "parallel", base / "single")
        print(f"\nmeshtron verify: {dims.degrees()} vs 1 process, model {small.model.name} "
              f"(hidden {small.model.hidden_size}, {small.model.num_layers} layers)")
        print(f"{'step':>6} {'parallel loss':>15} {'single loss':>15} {'rel diff':>10}")
        for step, a, b, rel in rows:
            print(f"{step:>6} {a:>15.8f} {b:>15.8f} {rel:>10.2e}")
        lines, ok = verdict(max(r[3] for r in rows), worst, cfg.verify.tolerance)
        print("\n".join(lines))
        if ok:
            shutil.rmtree(base, ignore_errors=True)  # nothing to look at: the numbers above are the result
            print("meshtron verify: OK")
        else:
            print(f"meshtron verify: FAILED: this layout does not reproduce the single-process run (both runs are "
                  f"kept in {base})", file=sys.stderr)
            status = 1
    return status  # the other ranks exit 0; torchrun reports rank 0's verdict


@hydra.main(**HYDRA_MAIN)
def _main(cfg: DictConfig) -> None:
    try:
        code = run(to_config(cfg))
    except ConfigError as err:
        exit_config_error(err, prog="meshtron verify")  # once, exit 2 on every rank
    sys.exit(code)


def main() -> None:
    run_hydra(_main, prog="meshtron verify")  # Hydra's own override errors exit 2 in one line too


if __name__ == "__main__":
    main()
