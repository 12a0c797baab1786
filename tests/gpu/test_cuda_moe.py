"""An MoE model on CUDA (bf16, torch._grouped_mm): one sync per training step, by torch's own detector, and the
grouped path equal to the loop over experts within bf16 rounding. Skipped without CUDA; the CPU proofs are
tests/unit/test_moe_model.py (transfer counter, grouped == loop in fp32)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 3
CUDA_MOE = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.family=mixtral", "model.moe.num_moe_experts=8",
            "model.moe.moe_router_topk=2",
            "model.moe.moe_ffn_hidden_size=64", "model.moe.moe_z_loss_coeff=0.001", "data.seq_len=64",
            "trainer.global_batch_size=8", "parallel.microbatch_size=2", f"trainer.max_steps={STEPS}",
            "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false", "trainer.device=cuda",
            "trainer.precision=bf16", "optim.warmup_steps=0"]


def test_moe_step_syncs_once_on_cuda(tmp_path, compose, monkeypatch):
    import trainer.loop as loop
    from trainer import step_vector
    from trainer.model.moe import grouped_mm_usable

    assert grouped_mm_usable(torch.device("cuda"), torch.bfloat16, 64, 64), "torch._grouped_mm does not run here"
    lines, first = inspect.getsourcelines(step_vector.StepVector.reduce)
    transfer = (Path(step_vector.__file__).name,
                first + next(i for i, line in enumerate(lines) if ".cpu()" in line))
    original, caught = loop._run_steps, []

    def watched(*args):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                caught.extend(w for w in seen if "synchroniz" in str(w.message))

    monkeypatch.setattr(loop, "_run_steps", watched)
    loop.train(compose(*CUDA_MOE, f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"))
    assert [(Path(w.filename).name, w.lineno) for w in caught] == [transfer] * STEPS


def test_grouped_equals_loop_on_cuda_bf16():
    """One MoE layer on the same input (so both paths route alike): outputs and input gradients agree."""
    from trainer.config import ModelConfig
    from trainer.model import GPTModel
    from trainer.model.moe import RouterStats
    from trainer.moe_config import MoEConfig

    cfg = ModelConfig(vocab_size=256, hidden_size=64, ffn_hidden_size=128, num_layers=1, num_attention_heads=4,
                      num_query_groups=2, moe=MoEConfig(num_moe_experts=8, moe_ffn_hidden_size=64))
    layer = GPTModel(cfg, seed=2).cuda().decoder.layers["0"].mlp
    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for grouped in (True, False):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xi, RouterStats(1, 4, grouped))
        out.float().square().sum().backward()
        results.append((out.detach().float(), xi.grad))
    scale = results[1][0].abs().max()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=float(scale) * 1e-2)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=float(results[1][1].abs().max()) * 2e-2)
