"""Qwen2/2.5 <-> meshtron: Llama plus biases on q, k and v (not on o_proj)."""

from checkpoint_convert.mapping import fuse_qkv
from checkpoint_convert.models.llama import LLAMA

_ATTN = "model.layers.*.self_attn"

QWEN2 = LLAMA.with_rules(
    fuse_qkv("decoder.layers.*.self_attention.linear_qkv.bias",
             f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
)
