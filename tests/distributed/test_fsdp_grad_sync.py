"""parallel.fsdp_grad_sync on 2 gloo ranks (FSDP, dp_shard=2), 2 micro-batches per rank and step.

every_microbatch reduce-scatters after each backward: between micro-batches a rank holds only its gradient
shards, never the whole model's unsharded gradients; last_microbatch holds them until the last backward.
Both give the gradients of one process running the same global batch (4 rows, 2 micro-batches of 2).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.launcher import run_ranks
from trainer.config import Config, ModelConfig, ParallelConfig, TrainerConfig
from trainer.loss import IGNORE_INDEX, count_valid

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, make_vocab_size_divisible_by=8)
ROWS, SEQ = 4, 16


def _cfg(grad_sync: str, dp_shard: int, microbatch: int) -> Config:
    return Config(model=MODEL, trainer=dataclasses.replace(TrainerConfig(), seed=5, global_batch_size=ROWS),
                  parallel=ParallelConfig(dp_shard=dp_shard, microbatch_size=microbatch, fsdp_grad_sync=grad_sync))


def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MODEL.vocab_size, (ROWS, SEQ), generator=gen)
    labels = torch.randint(0, MODEL.vocab_size, (ROWS, SEQ), generator=gen)
    labels[torch.rand(ROWS, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _unsharded_grads_held(modules) -> bool:
    """Any FSDP parameter holding an unsharded gradient (FSDP2 keeps them while sync is off)."""
    from torch.distributed.fsdp import FSDPModule

    for root in modules:
        for m in root.modules():
            group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
            for fp in group.fsdp_params if group is not None else []:
                unsharded = getattr(fp, "_unsharded_param", None)
                if fp.unsharded_accumulated_grad is not None or (unsharded is not None and unsharded.grad is not None):
                    return True
    return False


def _train_one_step(cfg: Config, world: int):
    """forward_backward over this rank's micro-batches; the state at each micro-batch boundary and the full
    gradients after the step."""
    import parallel.fsdp as fsdp
    from parallel.dims import ParallelDims
    from parallel.parallelize import build_parallel_model
    from trainer.step import forward_backward, local_batch

    device = torch.device("cpu")
    dims = ParallelDims.from_config(cfg.parallel, world)
    mesh = None if dims.is_single else dims.build_mesh("cpu")
    pm = build_parallel_model(cfg, dims, mesh, device)
    batch = _global_batch()
    boundaries, original = [], fsdp.set_gradient_sync

    def spy(modules, enabled):
        if boundaries or any(p.grad is not None for p in pm.parameters()):  # after the first backward
            boundaries.append({"unsharded_held": _unsharded_grads_held(modules),
                               "sharded_grads": all(p.grad is not None for p in pm.parameters())})
        else:
            boundaries.append(None)
        original(modules, enabled)

    fsdp.set_gradient_sync = spy
    try:
        forward_backward(pm, local_batch(batch, pm), count_valid(batch["labels"]), cfg, device)
    finally:
        fsdp.set_gradient_sync = original
    from torch.distributed.tensor import DTensor

    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in pm.modules[0].named_parameters()}
    return boundaries, grads


def _ranks(rank: int, world: int):
    return {mode: _train_one_step(_cfg(mode, 2, 1), world) for mode in ("every_microbatch", "last_microbatch")}


def test_every_microbatch_holds_only_shards_and_matches_one_process():
    results = run_ranks(2, _ranks)
    _, reference = _train_one_step(_cfg("every_microbatch", 1, 2), 1)
    every, last = results[0]["every_microbatch"], results[0]["last_microbatch"]
    # boundary 0 is before any backward; boundary 1 sits between the two micro-batches
    assert every[0][1] == {"unsharded_held": False, "sharded_grads": True}
    assert last[0][1] == {"unsharded_held": True, "sharded_grads": False}
    for result in results:
        for mode in ("every_microbatch", "last_microbatch"):
            grads = result[mode][1]
            assert grads.keys() == reference.keys()
            for name, g in reference.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, n=name, mode=mode: f"{mode} {n}: {m}")
    for name in reference:  # the two settings differ only by float summation order
        torch.testing.assert_close(every[1][name], last[1][name], rtol=1e-5, atol=1e-7)
