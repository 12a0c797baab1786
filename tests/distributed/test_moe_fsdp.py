"""An MoE model under FSDP (dp_shard=2, gloo) is the single-process model: each rank reads only its experts of
the HF checkpoint (FSDP's Shard(0) of the stacked tensors), and one step gives the same loss, router metrics
(auxiliary losses per row, so micro-batching and data ranks do not change them) and gradients as one process,
with one micro-batch or four."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.launcher import run_ranks
from trainer.config import Config, ParallelConfig, TrainerConfig
from trainer.loss import IGNORE_INDEX, count_valid

pytestmark = pytest.mark.distributed

ROWS, SEQ = 4, 16


def _cfg(hf_dir: str, dp_shard: int, microbatch: int) -> Config:
    from checkpoint_convert.hf import read_hf_config

    model = read_hf_config(hf_dir)
    model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, moe_z_loss_coeff=0.01))
    return Config(model=model, trainer=dataclasses.replace(TrainerConfig(), seed=5, global_batch_size=ROWS),
                  parallel=ParallelConfig(dp_shard=dp_shard, microbatch_size=microbatch))


def _global_batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    labels[torch.rand(ROWS, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _one_step(hf_dir: str, world: int, dp_shard: int, microbatch: int):
    from torch.distributed.tensor import DTensor

    from checkpoint_convert.hf import load_hf_weights
    from parallel.collectives import clip_grad_norm_
    from parallel.dims import ParallelDims, validate_layout
    from parallel.parallelize import build_parallel_model
    from trainer.step import forward_backward, local_batch, step_totals

    cfg = _cfg(hf_dir, dp_shard, microbatch)
    dims = ParallelDims.from_config(cfg.parallel, world)
    validate_layout(cfg, dims)
    mesh = None if dims.is_single else dims.build_mesh("cpu")
    device = torch.device("cpu")
    pm = build_parallel_model(cfg, dims, mesh, device, lambda m, partial: load_hf_weights(m, hf_dir, partial=partial))
    expert = dict(pm.modules[0].named_parameters())["decoder.layers.0.mlp.experts.linear_fc1_gate.weight"]
    local_experts = (expert.to_local() if isinstance(expert, DTensor) else expert).detach().clone()
    batch = _global_batch(cfg.model.vocab_size)
    local_sum = forward_backward(pm, local_batch(batch, pm), count_valid(batch["labels"]), cfg, device)
    grad_norm = clip_grad_norm_(pm.parameters(), float("inf"), mesh)
    totals = step_totals(local_sum, grad_norm, None, False, pm)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in pm.modules[0].named_parameters()}
    return totals.loss_sum, totals.grad_norm, totals.moe, grads, local_experts


def _ranks(rank: int, world: int, hf_dir: str):
    return _one_step(hf_dir, world, 2, 1)


def test_fsdp_reads_its_experts_and_matches_one_process(tmp_path):
    from safetensors import safe_open

    from tests.tiny_hf import tiny_hf_model

    hf_dir = tmp_path / "hf"
    tiny_hf_model("qwen3-moe").save_pretrained(hf_dir)  # 8 experts: 4 per FSDP rank
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        gates = torch.stack([f.get_tensor(f"model.layers.0.mlp.experts.{e}.gate_proj.weight") for e in range(8)])
    results = run_ranks(2, _ranks, str(hf_dir))
    for rank, result in enumerate(results):
        assert torch.equal(result[4], gates[4 * rank:4 * rank + 4])
    references = [_one_step(str(hf_dir), 1, 1, mb) for mb in (4, 1)]
    for loss, norm, moe, grads, experts in results + references[1:]:
        ref_loss, ref_norm, ref_moe, ref_grads, _ = references[0]
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
        assert moe.keys() == ref_moe.keys() == {"moe_aux_loss", "moe_z_loss", "moe_load_imbalance",
                                                "moe_imbalance_layer"}
        for key, value in ref_moe.items():
            assert moe[key] == pytest.approx(value, rel=1e-6), key
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
