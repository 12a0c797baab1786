"""Tiny random HF checkpoints, one per supported family variant, made from configs (no downloads).

Shapes follow tests/unit/test_hf_parity.py's SHAPE with 4 layers, so pipeline stages hold 2 layers each
and 4 heads / 2 query groups split over 2 tensor-parallel ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
# Band edges at wavelengths 8 and 32 fall inside a head_dim-16 spectrum: all three llama3 bands are used.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS = {
    "llama3.1": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)),
    "llama3.2-tied": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE,
                                                                tie_word_embeddings=True)),
    "mistral-window": lambda: (T.MistralForCausalLM, T.MistralConfig(**SHAPE, sliding_window=5)),
    "qwen2-tied-bias": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**SHAPE, tie_word_embeddings=True)),
    "qwen3-head-dim": lambda: (T.Qwen3ForCausalLM, T.Qwen3Config(**SHAPE, head_dim=24)),
}


# Mixtures of experts, apart from VARIANTS (whose every entry the Megatron conversion tests take). Widths are
# multiples of 16 bytes in fp32 and bf16 (hidden 64, experts 32 / 112), so torch._grouped_mm can run them.
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01)
MOE_VARIANTS = {
    # Layer 1 MoE, layers 0, 2, 3 dense (decoder_sparse_step 2 gives 1 and 3, mlp_only_layers takes 3 back).
    "qwen3-moe-mixed": lambda: (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        **SHAPE, **MOE, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3],
        norm_topk_prob=True)),
    "qwen3-moe": lambda: (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        **{**SHAPE, "num_hidden_layers": 2}, **MOE, num_experts=8, moe_intermediate_size=32, norm_topk_prob=False,
        head_dim=24)),
    "mixtral": lambda: (T.MixtralForCausalLM, T.MixtralConfig(**{**SHAPE, "num_hidden_layers": 2}, **MOE,
                                                             num_local_experts=4)),
    "qwen2-moe-shared": lambda: (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
        **{**SHAPE, "num_hidden_layers": 2}, **MOE, num_experts=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False)),
}


def tiny_hf_model(name: str, dtype: torch.dtype = torch.float32):
    return randomized(*{**VARIANTS, **MOE_VARIANTS}[name]()).to(dtype)


def randomized(cls, config):
    """`cls(config)` in eval mode, eager attention, every parameter random (seed 0)."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    # HF's init leaves norms at one and biases at zero; randomise everything so each tensor's mapping matters.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname else p.normal_(0.0, 0.08)
    return model


def save_tiny_hf(name: str, path: Path, dtype: torch.dtype = torch.float32):
    model = tiny_hf_model(name, dtype)
    model.save_pretrained(path)
    return model
