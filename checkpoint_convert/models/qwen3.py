"""Qwen3 <-> meshtron: Llama plus per-head RMSNorm on q and k (no qkv bias, unlike Qwen2)."""

from checkpoint_convert.mapping import rename
from checkpoint_convert.models.llama import LLAMA

QWEN3 = LLAMA.with_rules(
    rename("decoder.layers.*.self_attention.q_layernorm.weight", "model.layers.*.self_attn.q_norm.weight"),
    rename("decoder.layers.*.self_attention.k_layernorm.weight", "model.layers.*.self_attn.k_norm.weight"),
)
