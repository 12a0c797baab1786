"""LR schedule, weight-decay groups, and the global-token loss with gradient accumulation."""

import math

import pytest
import torch

from parallel.dims import ParallelDims
from parallel.parallelize import ParallelModel
from trainer.config import Config, ModelConfig, OptimConfig, ParallelConfig
from trainer.loss import IGNORE_INDEX, count_valid, cross_entropy_sum
from trainer.step import forward_backward, local_batch
from trainer.model import GPTModel
from trainer.optim import build_optimizer, build_scheduler, lr_at, param_groups

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                   num_query_groups=2, max_position_embeddings=64)


def test_warmup_then_cosine_reaches_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay="cosine")
    lrs = [lr_at(s, cfg, max_steps=14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_linear_and_constant_decay():
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert [lr_at(s, lin, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, decay="constant")
    assert [lr_at(s, const, 5) for s in range(5)] == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5])


def test_scheduler_follows_lr_at():
    model = GPTModel(TINY)
    cfg = OptimConfig(lr=0.01, min_lr=0.001, warmup_steps=3)
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 10) for s in range(10)])


def test_no_weight_decay_on_norms_and_biases():
    model = GPTModel(ModelConfig(**{**TINY.__dict__, "add_qkv_bias": True, "qk_layernorm": True}))
    decay, no_decay = param_groups(model.parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    assert nd and all(n.endswith("layernorm.weight") or n.endswith(".bias") for n in nd)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in nd
    assert all(p.ndim == 2 for p in decay["params"])


def test_loss_is_sum_over_global_valid_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :3] = IGNORE_INDEX
    total = cross_entropy_sum(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert count_valid(labels) == 7
    assert torch.allclose(total / count_valid(labels), ref)


def _batch(seed, n, seq=8, masked=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (n, seq), generator=g)
    labels = torch.randint(0, TINY.vocab_size, (n, seq), generator=g)
    labels[:masked, : seq // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("microbatch", [1, 2])
def test_accumulation_equals_one_big_batch_with_uneven_valid_tokens(microbatch):
    """Micro-batches with different valid-token counts give the same step as one batch of all of them:
    the loss is divided by the step's token count once, not averaged per micro-batch."""
    batch = _batch(1, 4, masked=3)
    results = []
    for mbs in (microbatch, 4):
        cfg = Config(model=TINY, parallel=ParallelConfig(microbatch_size=mbs))
        model = GPTModel(TINY, seed=0)
        pm = ParallelModel([(0, model)], ParallelDims.single())
        normalizer = count_valid(batch["labels"])
        loss_sum = forward_backward(pm, local_batch(batch, pm), normalizer, cfg, torch.device("cpu"))
        results.append((float(loss_sum) / normalizer, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


def test_document_loss_is_mean_of_document_means():
    from trainer.loss import DocumentLoss

    sample_ids = torch.tensor([[7, 7, 7, 9, -1], [9, 9, 3, 3, 3]])
    labels = torch.tensor([[1, 1, IGNORE_INDEX, 1, IGNORE_INDEX], [1, 1, 1, 1, 1]])
    token_losses = torch.tensor([[1.0, 3.0, 100.0, 4.0, 100.0], [5.0, 6.0, 1.0, 1.0, 1.0]])
    doc = DocumentLoss(sample_ids, torch.device("cpu"))
    # Split like two ranks would see it; the reduction here is the identity (one process).
    doc.add(token_losses[:1], labels[:1], sample_ids[:1])
    doc.add(token_losses[1:], labels[1:], sample_ids[1:])
    # doc 7: (1+3)/2 = 2; doc 9: (4+5+6)/3 = 5; doc 3: 1  -> mean 8/3, unlike the token mean 21/8
    assert doc.value(lambda t: t) == pytest.approx(8 / 3)
