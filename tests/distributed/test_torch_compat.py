"""trainer/torch_compat.py's collectives on 2 gloo ranks, against what one process computes. CI runs this file on
the oldest supported torch too (README, "Tests"), where the differences it papers over live."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.distributed

# Each rank's share of a Partial(sum) gradient; the true gradient is their sum.
PARTS = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-3.0, 1.0, 1.0, 0.5])]
REPLICATE, SHARD = torch.arange(4.0), torch.tensor([1.0, 2.0, 3.0, 4.0])


def _clip(rank: int, world_size: int, max_norm: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from parallel.collectives import clip_grad_norm_

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    params = []
    for placement, local in ((Replicate(), REPLICATE), (Partial(), PARTS[rank]), (Shard(0), SHARD.chunk(2)[rank])):
        param_placement = Shard(0) if placement == Shard(0) else Replicate()
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh, [param_placement]))
        p.grad = DTensor.from_local(local.clone(), mesh, [placement])
        params.append(p)
    total = clip_grad_norm_(params, max_norm)
    return {"total": float(total), "grads": [p.grad.full_tensor() for p in params]}


@pytest.mark.parametrize("max_norm", [1.0, 100.0], ids=["clipped", "unclipped"])
def test_clipping_scales_partial_gradients_like_every_other(max_norm):
    """Replicate, Partial(sum) (tensor-parallel norm weights under sequence parallelism) and Shard gradients
    on one mesh: the norm and the clipped gradients are one process's (torch 2.11's foreach multiply alone
    leaves the Partial one unscaled)."""
    full = [REPLICATE, PARTS[0] + PARTS[1], SHARD]
    norm = torch.cat(full).norm()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    for result in run_ranks(2, _clip, max_norm):
        assert result["total"] == pytest.approx(float(norm), rel=1e-6)
        for got, want in zip(result["grads"], full):
            torch.testing.assert_close(got, want * coef)


def _gather(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from trainer.torch_compat import all_gather_autograd

    x = torch.arange(6.0).reshape(1, 2, 3).add(10 * rank).requires_grad_()
    out = all_gather_autograd(x, gather_dim=1, group=dist.group.WORLD)
    weights = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape)
    (out * weights).sum().backward()
    return {"out": out.detach(), "grad": x.grad}


def test_all_gather_autograd_gathers_and_sums_gradients_back():
    """Forward: the ranks' tensors concatenated along the dim in rank order; backward: each rank gets the sum
    over ranks of the gradient of its own slice (every rank read every shard)."""
    results = run_ranks(2, _gather)
    shards = [torch.arange(6.0).reshape(1, 2, 3) + 10 * r for r in range(2)]
    weights = torch.arange(12.0).reshape(1, 4, 3)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["out"], torch.cat(shards, dim=1))
        torch.testing.assert_close(result["grad"], 2 * weights[:, 2 * rank:2 * rank + 2])
