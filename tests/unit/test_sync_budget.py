"""At most one device->host transfer per optimizer step, none inside the micro-batch loop, counted on CPU by
tests/sync_counter.py (tensors descending from the model are device tensors; see there). The same budget on
CUDA, with torch's own sync detector, is tests/gpu/test_cuda_sync_budget.py."""

from __future__ import annotations

import pytest
import torch

from tests import faults
from tests.sync_counter import count_transfers, counted_train
from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, count_valid
from trainer.model import GPTModel

TINY = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "data.seq_len=32", "trainer.global_batch_size=4",
        "parallel.microbatch_size=2",  # 2 micro-batches per step
        "trainer.max_steps=3", "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false",
        "trainer.device=cpu", "optim.warmup_steps=0"]


def test_one_transfer_per_step(tmp_path, compose):
    cfg = compose(*TINY, f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    transfers = counted_train(cfg)
    assert [t.what for t in transfers] == ["Tensor.cpu"] * 3, [(t.what, t.stack[-4:]) for t in transfers]
    assert all("step_totals" in t.stack and "forward_backward" not in t.stack for t in transfers)


def test_nonfinite_step_may_spend_more(tmp_path, compose, capsys):
    """Only the (rare) non-finite step reads more: which ranks went bad."""
    cfg = compose(*TINY, f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                  "trainer.nonfinite=skip")
    with faults.installed(faults.Faults(nan_loss_steps=[2])):
        transfers = counted_train(cfg)
    assert [t.what for t in transfers if "step_totals" in t.stack] == ["Tensor.cpu"] * 3
    extra = [t for t in transfers if "step_totals" not in t.stack]
    assert len(extra) == 1 and "locally_finite" in extra[0].stack
    assert "non-finite loss at step 2" in capsys.readouterr().out


def test_the_counter_catches_the_old_loop():
    """What the loop used to do per step is counted: a bool() per gradient, float() of the loss and of the norm,
    boolean indexing of device tensors; reads of the host batch are not."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, ffn_hidden_size=32, num_layers=1, num_attention_heads=2,
                      num_query_groups=1, make_vocab_size_divisible_by=8)
    model = GPTModel(cfg, seed=0)
    tokens = torch.randint(0, 64, (2, 8))
    labels = tokens.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    with count_transfers(model) as counter:
        normalizer = count_valid(labels)  # host batch: free
        token_losses = model(tokens.to("cpu"), labels=labels.to("cpu"))
        (token_losses.sum() / normalizer).backward()
        assert counter.transfers == []
        grads = [p.grad for p in model.parameters()]
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        assert len(counter.transfers) == len(grads)
        float(token_losses.detach().sum())
        float(torch.nn.utils.get_total_norm(grads))
        assert len(counter.transfers) == len(grads) + 2
        valid = labels.to("cpu") != IGNORE_INDEX
        token_losses.detach()[valid]  # old DocumentLoss.add: a value-dependent shape
        assert counter.transfers[-1].what.startswith("aten.index")
        host = token_losses.detach().cpu()
        n = len(counter.transfers)
        float(host.sum()), host.tolist()  # already on the host: free
        assert len(counter.transfers) == n


@pytest.mark.parametrize("grad_sync", ["every_microbatch", "last_microbatch"])
def test_grad_sync_setting_keeps_single_process_losses(tmp_path, compose, grad_sync):
    """Without FSDP the setting changes nothing, and the loop still reads once per step."""
    cfg = compose(*TINY, f"trainer.output_dir={tmp_path / grad_sync}", f"data.cache_dir={tmp_path / 'cache'}",
                  f"parallel.fsdp_grad_sync={grad_sync}")
    assert len(counted_train(cfg)) == 3
