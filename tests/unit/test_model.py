"""GPTModel on its own: shapes, Megatron names and QKV layout, init, sliding-window masking."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from checkpoint_convert.mapping import interleave_qkv, split_qkv
from trainer.config import ModelConfig
from trainer.model import GPTModel, TransformerLayer
from trainer.model.attention import SelfAttention, TokenLayout, allowed_mask

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)


def _cfg(**kw) -> ModelConfig:
    return dataclasses.replace(TINY, **kw)


@pytest.mark.parametrize("kw", [
    {},                                                  # GQA
    {"num_query_groups": 4},                             # MHA
    {"num_query_groups": 1},                             # MQA
    {"kv_channels": 12, "qk_layernorm": True, "tie_word_embeddings": True},  # Qwen3-like
    {"add_qkv_bias": True, "sliding_window": 3},
])
def test_forward_shapes(kw):
    model = GPTModel(_cfg(**kw))
    ids = torch.randint(0, 64, (3, 7))
    assert model(ids).shape == (3, 7, 64)
    assert model(ids, torch.arange(7).expand(3, 7) + 5).shape == (3, 7, 64)
    assert isinstance(model.decoder.layers["1"], TransformerLayer)


def test_parameter_names_qwen3_tied():
    cfg = _cfg(family="qwen3", kv_channels=12, qk_layernorm=True, tie_word_embeddings=True)
    names = {n for n, _ in GPTModel(cfg).named_parameters()}
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
                 "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
                 "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1_gate.weight",
                 "mlp.linear_fc1_up.weight", "mlp.linear_fc2.weight"]
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    expected |= {f"decoder.layers.{i}.{n}" for i in range(2) for n in per_layer}
    assert names == expected
    # Buffers (rotary inv_freq) never reach checkpoints.
    assert set(GPTModel(cfg).state_dict()) == expected


def test_parameter_shapes_and_untied_output_layer():
    model = GPTModel(_cfg(kv_channels=12, add_qkv_bias=True))
    p = dict(model.named_parameters())
    assert p["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((2 + 2) * 2 * 12, 32)
    assert p["decoder.layers.0.self_attention.linear_qkv.bias"].shape == (96,)
    assert p["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, 4 * 12)
    assert p["output_layer.weight"].shape == (64, 32)


# ------------------------------------------------------------------------------------- QKV layout


def test_interleave_qkv_layout_per_query_group():
    G, hpg, d = 2, 3, 2
    q = torch.arange(G * hpg * d).float()[:, None] + 100  # rows 100.. : query heads 0..5
    k = torch.arange(G * d).float()[:, None] + 200
    v = torch.arange(G * d).float()[:, None] + 300
    fused = interleave_qkv(q, k, v, G, d).squeeze(1).tolist()
    group0 = [100, 101, 102, 103, 104, 105, 200, 201, 300, 301]
    group1 = [106, 107, 108, 109, 110, 111, 202, 203, 302, 303]
    assert fused == group0 + group1
    for a, b in zip(split_qkv(interleave_qkv(q, k, v, G, d), G, d), (q, k, v)):
        assert torch.equal(a, b)
    bias = interleave_qkv(q[:, 0], k[:, 0], v[:, 0], G, d)  # 1-D biases take the same path
    assert bias.tolist() == group0 + group1


def _reference_attention(x, q_w, k_w, v_w, o_w, hpg, d, cos, sin):
    """Plain multi-head attention from separate q/k/v weights, HF-style repeat_kv."""
    B, S, _ = x.shape
    q = (x @ q_w.T).view(B, S, -1, d).transpose(1, 2)
    k = (x @ k_w.T).view(B, S, -1, d).transpose(1, 2)
    v = (x @ v_w.T).view(B, S, -1, d).transpose(1, 2)

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos[:, None] + torch.cat((-t2, t1), -1) * sin[:, None]

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(hpg, dim=1), v.repeat_interleave(hpg, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, S, -1) @ o_w.T


def _rope(model: GPTModel, B: int, S: int):
    return model.rotary_pos_emb(torch.arange(S).expand(B, S), torch.float32)


def test_attention_reads_the_interleaved_layout():
    cfg = _cfg(num_attention_heads=6, num_query_groups=2, hidden_size=36)  # 3 heads per group, d=6
    torch.manual_seed(0)
    model = GPTModel(cfg)
    attn: SelfAttention = model.decoder.layers["0"].self_attention
    d, G, hpg = 6, 2, 3
    q_w, k_w, v_w = torch.randn(G * hpg * d, 36), torch.randn(G * d, 36), torch.randn(G * d, 36)
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(interleave_qkv(q_w, k_w, v_w, G, d))
    x = torch.randn(2, 5, 36)
    cos, sin = _rope(model, 2, 5)
    ref = _reference_attention(x, q_w, k_w, v_w, attn.linear_proj.weight, hpg, d, cos, sin)
    torch.testing.assert_close(attn(x, (cos, sin), TokenLayout()), ref, rtol=1e-5, atol=1e-5)


def test_attention_takes_group_count_from_the_tensor_shape():
    """A dim-0 half of linear_qkv plus the matching column half of linear_proj is a valid TP shard:
    the two partial outputs sum to the full output."""
    cfg = _cfg(num_attention_heads=4, num_query_groups=2, add_qkv_bias=True)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    attn = model.decoder.layers["0"].self_attention
    with torch.no_grad():
        attn.linear_qkv.bias.normal_()
    x = torch.randn(2, 5, 32)
    rope = _rope(model, 2, 5)
    full = attn(x, rope, TokenLayout())
    partial = 0
    rows, cols = attn.linear_qkv.weight.shape[0] // 2, attn.linear_proj.weight.shape[1] // 2
    for r in range(2):
        shard = SelfAttention(cfg)
        shard.linear_qkv = torch.nn.Linear(32, rows)
        shard.linear_proj = torch.nn.Linear(cols, 32, bias=False)
        with torch.no_grad():
            shard.linear_qkv.weight.copy_(attn.linear_qkv.weight[r * rows:(r + 1) * rows])
            shard.linear_qkv.bias.copy_(attn.linear_qkv.bias[r * rows:(r + 1) * rows])
            shard.linear_proj.weight.copy_(attn.linear_proj.weight[:, r * cols:(r + 1) * cols])
        partial = partial + shard(x, rope, TokenLayout())
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- init


def test_init_is_deterministic_and_megatron_scaled():
    cfg = _cfg(num_layers=8, hidden_size=256, ffn_hidden_size=512, add_qkv_bias=True, init_std=0.05)
    a = GPTModel(cfg, seed=3)
    torch.manual_seed(99)  # the global RNG plays no part: each tensor has its own (seed, name) generator
    b = GPTModel(cfg, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(GPTModel(cfg, seed=4).embedding.word_embeddings.weight, a.embedding.word_embeddings.weight)

    p = dict(a.named_parameters())
    layer = "decoder.layers.0"
    assert p[f"{layer}.self_attention.linear_qkv.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    residual = 0.05 / math.sqrt(2 * 8)
    assert p[f"{layer}.self_attention.linear_proj.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert p[f"{layer}.mlp.linear_fc2.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert p[f"{layer}.mlp.linear_fc1_up.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(p[f"{layer}.self_attention.linear_qkv.bias"], torch.zeros(256 * 2))
    assert torch.equal(p[f"{layer}.input_layernorm.weight"], torch.ones(256))


def test_meta_device_build_then_init_weights_matches_cpu_init():
    cfg = _cfg(rope_scaling=None, qk_layernorm=True)
    with torch.device("meta"):
        meta = GPTModel(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=7)
    cpu = GPTModel(cfg, seed=7)
    for (name, pa), pb in zip(meta.state_dict().items(), cpu.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(meta.rotary_pos_emb.inv_freq, cpu.rotary_pos_emb.inv_freq)
    ids = torch.randint(0, 64, (1, 6))
    assert torch.equal(meta(ids), cpu(ids))


# ---------------------------------------------------------------------------------- sliding window


def test_sliding_window_mask_matches_mistral_semantics():
    index = torch.arange(6)[None]
    mask = allowed_mask(index, index, 3)
    # Query i sees keys i-2, i-1, i: `window` tokens including itself.
    expected = torch.tensor([[j <= i and j > i - 3 for j in range(6)] for i in range(6)])
    assert torch.equal(mask[0, 0], expected)
    assert TokenLayout(sliding_window=None).is_plain_causal(6)
    assert TokenLayout(sliding_window=0).is_plain_causal(6)
    assert TokenLayout(sliding_window=6).is_plain_causal(6)  # window covers the row: plain causal
    assert not TokenLayout(sliding_window=5).is_plain_causal(6)


def test_mask_follows_row_index_and_documents():
    """seq_index is the token's place in the full row (context parallelism holds pieces of rows)."""
    q = torch.tensor([[0, 1, 6, 7]])  # a rank's zigzag chunks of an 8-token row
    k = torch.arange(8)[None]
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    mask = allowed_mask(q, k, None, doc[:, q[0]], doc)[0, 0]
    assert mask[2].tolist() == [False] * 4 + [True] * 3 + [False]  # token 6: doc 1, keys 4..6
    assert mask[1].tolist() == [True, True] + [False] * 6


def test_sliding_window_limits_what_one_layer_sees():
    window, S = 3, 8
    torch.manual_seed(0)
    model = GPTModel(_cfg(num_layers=1, sliding_window=window))
    ids = torch.randint(1, 64, (1, S))
    changed = ids.clone()
    changed[0, 0] = 0
    with torch.no_grad():
        diff = (model(ids) - model(changed)).abs().amax(-1)[0]
    assert (diff[:window] > 0).all()  # token 0 is inside these queries' windows
    assert (diff[window:] == 0).all()  # and outside every later one


def test_window_zero_or_none_or_wide_is_full_causal():
    torch.manual_seed(0)
    base = GPTModel(_cfg())
    ids = torch.randint(0, 64, (2, 6))
    ref = base(ids)
    for window in (0, 6, 100):
        other = GPTModel(_cfg(sliding_window=window))
        other.load_state_dict(base.state_dict())
        assert torch.equal(other(ids), ref)
    narrow = GPTModel(_cfg(sliding_window=2))
    narrow.load_state_dict(base.state_dict())
    assert not torch.allclose(narrow(ids), ref)
