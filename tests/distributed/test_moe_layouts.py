"""MoE models from HF checkpoints (Qwen3-MoE: 8 experts, top-2; Mixtral: 4 experts; Qwen2-MoE: 4 experts and a
gated shared expert) give one process's loss, router metrics and gradients after one step at each layout:
FSDP, expert parallelism with HSDP, full recompute, TP (+SP) and FSDP x TP, and the MoE layer under TP without
ep (under CP: the matrix's ep2 x cp2). Each rank also holds exactly its slice of the experts as one process reads them. The layouts run
one micro-batch per forward and the reference four, so the auxiliary losses (per row) must not depend on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.launcher import run_ranks
from trainer.config import Config, ParallelConfig, TrainerConfig
from trainer.loss import IGNORE_INDEX, count_valid

pytestmark = pytest.mark.distributed

ROWS, SEQ = 4, 16

# (id, world size, parallel settings, tests/tiny_hf.py model). ep2 x fsdp2, x tp2, x pp2 and x cp2 train 3 steps
# in the layout matrix (test_mesh_matrix.py); these check one step's gradients and router metrics exactly.
LAYOUTS = [
    # FSDP alone: each rank reads its Shard(0) of the stacked experts from the HF checkpoint.
    ("fsdp2", 2, dict(dp_shard=2), "qwen3-moe"),
    # Full recompute replays the dispatcher's all-to-alls in backward.
    ("ep2_ac_full", 2, dict(dp_shard=2, ep=2, activation_checkpoint="full"), "qwen3-moe"),
    ("ep2_hsdp", 4, dict(dp_replicate=2, dp_shard=2, ep=2), "qwen3-moe"),
    ("tp2", 2, dict(dp_shard=1, tp=2), "qwen3-moe"),
    # ep x fsdp x tp: 8 ranks, each expert on one ep rank of its tp coordinate and sharded over 2 more.
    ("qwen3_moe_ep2_fsdp2_tp2", 8, dict(dp_shard=4, ep=2, tp=2), "qwen3-moe"),
    ("mixtral_ep2_fsdp2_tp2", 8, dict(dp_shard=4, ep=2, tp=2), "mixtral"),
    ("qwen2_moe_shared_ep2_tp2", 4, dict(dp_shard=2, ep=2, tp=2), "qwen2-moe-shared"),
]
# Not in CI (pytest -m extended): Mixtral at 8 ranks (its HF mapping: tests/unit/test_moe_hf_parity.py; the layout:
# qwen3-moe above).
EXTENDED = {"mixtral_ep2_fsdp2_tp2"}


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
    """(HF dir, the single-process step) per tiny_hf model, made on first use."""
    from tests.tiny_hf import tiny_hf_model

    made: dict[str, tuple] = {}

    def get(model: str):
        if model not in made:
            hf_dir = tmp_path_factory.mktemp("moe") / model
            tiny_hf_model(model).save_pretrained(hf_dir)
            made[model] = str(hf_dir), _one_step(str(hf_dir), 1, dict(dp_shard=1), ROWS)
        return made[model]

    return get


@pytest.mark.parametrize("name,world,parallel,model", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.slow, pytest.mark.extended] if c[0] in EXTENDED else ())
    for c in LAYOUTS])
def test_moe_layout_matches_one_process(moe_checkpoint, name, world, parallel, model):
    hf_dir, reference = moe_checkpoint(model)
    ref_loss, ref_norm, ref_moe, ref_grads, (_, all_experts) = reference
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
            assert torch.equal(values, all_experts[box]), f"{name}: a rank holds the wrong experts"
    ep = parallel.get("ep", 1)
    assert all(r[4][1].shape[0] <= all_experts.shape[0] // ep for r in results)  # E/ep experts or fewer a rank
    assert merged.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        ours = merged[key][:g.shape[0]]  # tp pads the vocabulary to a multiple of 128 x tp
        torch.testing.assert_close(ours, g, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{name}: {k}: {m}")
