"""An MoE model (Qwen3-MoE, 8 experts, top-2, from an HF checkpoint) gives one process's loss, router metrics
and gradients after one step at each layout: expert parallelism alone and with FSDP, TP (+SP), PP and CP, and
the MoE layer under TP and CP without ep. Each rank also holds exactly its experts of the checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.launcher import run_ranks
from trainer.config import Config, ParallelConfig, TrainerConfig
from trainer.loss import IGNORE_INDEX, count_valid

pytestmark = pytest.mark.distributed

ROWS, SEQ, EXPERTS = 4, 16, 8

# (id, world size, parallel settings)
LAYOUTS = [
    ("ep2", 2, dict(dp_shard=2, ep=2)),
    ("ep2_fsdp2", 4, dict(dp_shard=4, ep=2)),
    ("ep2_hsdp", 4, dict(dp_replicate=2, dp_shard=2, ep=2)),
    ("ep2_tp2", 4, dict(dp_shard=2, ep=2, tp=2)),
    ("ep2_pp2", 4, dict(dp_shard=2, ep=2, pp=2)),
    ("ep2_cp2", 2, dict(dp_shard=1, cp=2, ep=2)),
    ("tp2", 2, dict(dp_shard=1, tp=2)),
    ("cp2", 2, dict(dp_shard=1, cp=2)),
]


def _cfg(hf_dir: str, parallel: dict, microbatch: int) -> Config:
    from checkpoint_convert.hf import read_hf_config

    model = read_hf_config(hf_dir)
    model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, moe_z_loss_coeff=0.01))
    return Config(model=model, trainer=dataclasses.replace(TrainerConfig(), seed=5, global_batch_size=ROWS),
                  parallel=ParallelConfig(microbatch_size=microbatch, **parallel))


def _global_batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    labels[torch.rand(ROWS, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _one_step(hf_dir: str, world: int, parallel: dict, microbatch: int):
    from torch.distributed.tensor import DTensor

    from checkpoint_convert.hf import load_hf_weights
    from parallel.collectives import clip_grad_norm_
    from parallel.dims import ParallelDims, validate_layout
    from parallel.parallelize import build_parallel_model
    from trainer.model.init import clean_fqn, local_region
    from trainer.step import forward_backward, local_batch, step_totals

    cfg = _cfg(hf_dir, parallel, microbatch)
    dims = ParallelDims.from_config(cfg.parallel, world)
    validate_layout(cfg, dims)
    mesh = None if dims.is_single else dims.build_mesh("cpu")
    device = torch.device("cpu")
    pm = build_parallel_model(cfg, dims, mesh, device, lambda m, partial: load_hf_weights(m, hf_dir, partial=partial))
    # This rank's part of the first MoE layer's gate experts (when it holds that layer): (region, values).
    held = None
    for m in pm.modules:
        for name, p in m.named_parameters():
            if clean_fqn(name) == "decoder.layers.0.mlp.experts.linear_fc1_gate.weight":
                local = p.to_local() if isinstance(p, DTensor) else p
                held = (local_region(p), local.detach().clone())
    batch = _global_batch(cfg.model.vocab_size)
    local_sum = forward_backward(pm, local_batch(batch, pm), count_valid(batch["labels"]), cfg, device)
    grad_norm = clip_grad_norm_(pm.parameters(), float("inf"), mesh, exclude=pm.duplicates)
    totals = step_totals(local_sum, grad_norm, None, False, pm)
    grads = {}
    for m in pm.modules:
        for n, p in m.named_parameters():
            if p.grad is not None and p not in pm.duplicates:
                grads[clean_fqn(n)] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
    return totals.loss_sum, totals.grad_norm, totals.moe, grads, held


def _ranks(rank: int, world: int, hf_dir: str, parallel: dict):
    return _one_step(hf_dir, world, parallel, 1)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    from safetensors import safe_open

    from tests.tiny_hf import tiny_hf_model

    hf_dir = tmp_path_factory.mktemp("moe") / "hf"
    tiny_hf_model("qwen3-moe").save_pretrained(hf_dir)
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        gates = torch.stack([f.get_tensor(f"model.layers.0.mlp.experts.{e}.gate_proj.weight")
                             for e in range(EXPERTS)])
    return str(hf_dir), gates, _one_step(str(hf_dir), 1, dict(dp_shard=1), ROWS)


@pytest.mark.parametrize("name,world,parallel", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_moe_layout_matches_one_process(moe_checkpoint, name, world, parallel):
    hf_dir, gates, reference = moe_checkpoint
    ref_loss, ref_norm, ref_moe, ref_grads, _ = reference
    results = run_ranks(world, _ranks, hf_dir, parallel)
    merged: dict[str, torch.Tensor] = {}
    for loss, norm, moe, grads, held in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
        assert moe.keys() == ref_moe.keys()
        for key, value in ref_moe.items():
            assert moe[key] == pytest.approx(value, rel=1e-6), (name, key)
        merged.update(grads)  # pipeline stages each hold their layers' gradients
        if held is not None:
            region, values = held
            box = tuple(slice(a, b) for a, b in region) if region is not None else slice(None)
            assert torch.equal(values, gates[box]), f"{name}: a rank holds the wrong experts"
    assert merged.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        ours = merged[key][:g.shape[0]]  # tp pads the vocabulary to a multiple of 128 x tp
        torch.testing.assert_close(ours, g, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{name}: {k}: {m}")
