"""MoE beside the model: the parameter count the run prints, the active count MFU uses, verify's shrunken MoE
copy and selective activation checkpointing of the expert GEMMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.dims import ParallelDims
from trainer.config import Config, ModelConfig
from trainer.flops import matmul_params_per_token
from trainer.loop import cfg_param_count
from trainer.model import GPTModel
from trainer.moe_config import MoEConfig
from trainer.verify import shrink_model

E, K = 4, 2
TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                   num_query_groups=2, make_vocab_size_divisible_by=8,
                   moe=MoEConfig(num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=16,
                                 moe_layer_freq=[0, 1, 1]))


def _cfg(model: dict | None = None, **moe) -> ModelConfig:
    return dataclasses.replace(TINY, **(model or {}), moe=dataclasses.replace(TINY.moe, **moe))


def _meta_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPTModel(cfg).parameters())


VARIANTS = {
    "dense_first": ({}, {}),
    "every_layer": ({}, {"moe_layer_freq": None}),
    "shared_gated": ({}, {"moe_shared_expert_intermediate_size": 24, "moe_shared_expert_gate": True}),
    "shared_ungated": ({"tie_word_embeddings": True}, {"moe_shared_expert_intermediate_size": 8}),
    "mixtral_width": ({"qk_layernorm": True, "add_qkv_bias": True}, {"moe_ffn_hidden_size": None}),
    "dense_model": ({}, {"num_moe_experts": None, "moe_layer_freq": None}),
}


# ------------------------------------------------------------------------------------ parameter counts


def test_param_count_by_hand():
    # attention per layer: qkv 32 * (4 + 2 * 2) * 8 = 2048, proj 4 * 8 * 32 = 1024; two norms 64 -> 3136
    # dense MLP 3 * 32 * 48 = 4608; an MoE MLP: router 4 * 32 = 128 + 4 experts * 3 * 32 * 16 = 6144 -> 6272
    # embedding + output 2 * 64 * 32 = 4096, final norm 32
    assert cfg_param_count(Config(model=TINY)) == 3 * 3136 + 4608 + 2 * 6272 + 4096 + 32 == 30688
    shared = _cfg(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True)
    # + per MoE layer: shared SwiGLU 3 * 32 * 24 = 2304 and its gate row 32
    assert cfg_param_count(Config(model=shared)) == 30688 + 2 * (2304 + 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_equals_the_model(variant):
    model, moe = VARIANTS[variant]
    cfg = _cfg(model, **moe)
    assert cfg_param_count(Config(model=cfg)) == _meta_count(cfg)


@pytest.mark.parametrize("preset, total", [("qwen3_30b_a3b", 30.53e9), ("mixtral_8x7b", 46.70e9)])
def test_param_count_of_the_presets(compose, preset, total):
    cfg = compose(f"model={preset}", "data.seq_len=1024")
    assert cfg_param_count(cfg) == _meta_count(cfg.model)
    assert cfg_param_count(cfg) == pytest.approx(total, rel=1e-3)


def _active_from_model(cfg: ModelConfig) -> int:
    """The matmul weights one token goes through, read off the built model: every 2-D weight but the
    embedding's (a gather) and the stacked experts at top_k / E of their size; the output layer's matmul is
    counted even when tied to the embedding."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    m = cfg.moe
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embedding.") or p.ndim < 2:
            continue
        total += p.numel() * m.moe_router_topk // m.num_moe_experts if ".experts." in name else p.numel()
    if cfg.tie_word_embeddings:
        total += model.embedding.word_embeddings.weight.numel()
    return total


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "dense_model"])
def test_mfu_counts_active_parameters_as_the_model_has_them(variant):
    model, moe = VARIANTS[variant]
    cfg = _cfg(model, **moe)
    if cfg.add_qkv_bias:  # biases are no matmul weights: compare the matmul part only
        cfg = dataclasses.replace(cfg, add_qkv_bias=False)
    assert matmul_params_per_token(cfg) == _active_from_model(cfg)
    assert matmul_params_per_token(cfg) < cfg_param_count(Config(model=cfg))


def test_mfu_of_an_moe_equals_the_dense_model_of_its_active_width():
    """top_k x expert width = the dense ffn: the same FLOPs per token but the router's matmul."""
    moe = _cfg({"ffn_hidden_size": 32}, moe_ffn_hidden_size=16, moe_layer_freq=None)
    dense = _cfg({"ffn_hidden_size": 32}, num_moe_experts=None, moe_layer_freq=None)
    assert matmul_params_per_token(moe) == matmul_params_per_token(dense) + 3 * E * 32


# ------------------------------------------------------------------------------------ trainer.verify


def _dims(**degrees) -> ParallelDims:
    d = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 1, **degrees}
    world = d["dp_replicate"] * d["dp_shard"] * d["tp"] * d["pp"] * d["cp"]  # ep is carved from dp_shard x cp
    return ParallelDims(world_size=world, **d)


@pytest.mark.parametrize("preset", ["qwen3_30b_a3b", "mixtral_8x7b"])
def test_shrunk_moe_keeps_its_structure_small(compose, preset):
    big = compose(f"model={preset}", "data.seq_len=1024").model
    small = shrink_model(big, _dims(dp_shard=2), virtual_stages=1)
    small.validate()
    m, b = small.moe, big.moe
    assert m.enabled and small.family == big.family
    assert m.num_moe_experts == 4 and m.moe_router_topk == 2 < m.num_moe_experts
    assert m.moe_router_pre_softmax == b.moe_router_pre_softmax and m.aux_loss_coeff == b.aux_loss_coeff
    # Qwen3's experts are narrower than its dense width; Mixtral's use the dense width (None) and still do.
    assert (m.moe_ffn_hidden_size is None) == (b.moe_ffn_hidden_size is None)
    assert m.expert_ffn(small.ffn_hidden_size) <= small.ffn_hidden_size
    assert m.moe_layer_freq is None and m.moe_layers(small.num_layers) == list(range(small.num_layers))
    assert cfg_param_count(Config(model=small)) == _meta_count(small)
    assert _meta_count(dataclasses.replace(small, vocab_size=64)) < 200_000  # trainer.verify sets the vocabulary


def test_shrunk_moe_keeps_shared_experts_and_small_topk():
    big = dataclasses.replace(TINY, hidden_size=2048, ffn_hidden_size=5632, num_layers=24, num_attention_heads=16,
                              num_query_groups=16, moe=MoEConfig(
                                  num_moe_experts=60, moe_router_topk=4, moe_ffn_hidden_size=1408,
                                  moe_shared_expert_intermediate_size=5632, moe_shared_expert_gate=True,
                                  moe_expert_capacity_factor=1.25, moe_z_loss_coeff=1e-3))
    small = shrink_model(big, _dims(tp=2), virtual_stages=1)
    small.validate()
    m = small.moe
    assert (m.num_moe_experts, m.moe_router_topk) == (4, 2)
    assert m.moe_shared_expert_gate and 0 < m.moe_shared_expert_intermediate_size <= 2 * small.hidden_size
    assert m.moe_ffn_hidden_size % 2 == 0 and m.moe_shared_expert_intermediate_size % 2 == 0  # tp divides them
    assert m.moe_expert_capacity_factor == 1.25 and m.moe_z_loss_coeff == 1e-3
    assert _meta_count(small) == cfg_param_count(Config(model=small))
    # A model with few experts keeps them (and top_k <= experts).
    few = shrink_model(dataclasses.replace(TINY, moe=MoEConfig(num_moe_experts=2, moe_router_topk=2)),
                       _dims(dp_shard=2), 1)
    assert (few.moe.num_moe_experts, few.moe.moe_router_topk) == (2, 2)
    few.validate()


@pytest.mark.parametrize("ep, dp_shard, experts", [(2, 2, 4), (8, 8, 8), (4, 8, 4)])
def test_shrunk_moe_splits_over_expert_parallel_ranks(compose, ep, dp_shard, experts):
    big = compose("model=qwen3_30b_a3b", "data.seq_len=1024").model
    small = shrink_model(big, _dims(dp_shard=dp_shard, ep=ep), virtual_stages=1)
    assert small.moe.num_moe_experts == experts and small.moe.num_moe_experts % ep == 0
    assert small.moe.moe_router_topk == 2


@pytest.mark.parametrize("freq, pp, virtual, expected", [
    ([0, 1] * 24, 1, 1, [0, 1]),                      # decoder_sparse_step 2
    ([0, 0, 0] + [1] * 45, 1, 1, [0, 1]),             # first three dense (cut to two: one MoE kept)
    ([1] * 47 + [0], 1, 1, [0, 1]),                   # mlp_only_layers [47]: a dense layer kept
    ([1] * 48, 1, 1, [1, 1]),
    ([0, 1] * 24, 2, 2, [0, 1, 0, 1]),                # pp 2 x 2 virtual stages: four layers
    ([0, 0, 0, 0, 0, 1] * 8, 2, 2, [0, 0, 0, 1]),
])
def test_shrunk_moe_layer_pattern(freq, pp, virtual, expected):
    big = dataclasses.replace(TINY, num_layers=len(freq), moe=dataclasses.replace(TINY.moe, moe_layer_freq=freq))
    big.validate()
    small = shrink_model(big, _dims(pp=pp), virtual_stages=virtual)
    assert small.moe.moe_layer_freq == expected
    small.validate()


def test_shrunk_dense_model_stays_dense():
    dense = _cfg(num_moe_experts=None, moe_layer_freq=None)
    assert not shrink_model(dense, _dims(dp_shard=2), 1).moe.enabled


# ------------------------------------------------------------------------- selective activation ckpt


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_selective_checkpointing_saves_the_expert_gemms():
    """Under the selective policy the recompute before backward reruns no _grouped_mm (their outputs are
    kept); full recompute reruns the three of every MoE layer's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy

    from parallel import activation_checkpoint as ac
    from trainer.model.moe import grouped_mm_usable

    grouped = torch.ops.aten._grouped_mm.default
    assert grouped in ac._SAVE and ac._policy(None, grouped) == CheckpointPolicy.MUST_SAVE
    cfg = _cfg(moe_layer_freq=[0, 1, 0])
    # Also runs (and caches) grouped_mm_usable's probe, whose _grouped_mm calls must not be counted below.
    if not grouped_mm_usable(torch.device("cpu"), torch.float32, cfg.hidden_size, 16):
        pytest.skip("torch._grouped_mm does not run on this CPU")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is grouped
            return func(*args, **(kwargs or {}))

    tokens = torch.randint(0, cfg.vocab_size, (2, 8))

    def calls(mode: str) -> int:
        model = GPTModel(cfg, seed=1)
        ac.apply_activation_checkpointing(model, mode)
        with Count() as count:
            model(tokens, labels=tokens).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        return count.calls

    none, full, selective = calls("none"), calls("full"), calls("selective")
    assert none == 9 and full == none + 3  # 3 forward + 6 backward; full recomputes gate, up and down
    assert selective == none
