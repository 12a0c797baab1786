"""Llama 2/3/3.1 <-> meshtron: the base table every other family extends."""

from checkpoint_convert.mapping import MappingTable, fuse_qkv, rename

_ATTN = "model.layers.*.self_attn"

LLAMA = MappingTable((
    rename("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    rename("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
    fuse_qkv("decoder.layers.*.self_attention.linear_qkv.weight",
             f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
    rename("decoder.layers.*.self_attention.linear_proj.weight", f"{_ATTN}.o_proj.weight"),
    rename("decoder.layers.*.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight"),
    rename("decoder.layers.*.mlp.linear_fc1_gate.weight", "model.layers.*.mlp.gate_proj.weight"),
    rename("decoder.layers.*.mlp.linear_fc1_up.weight", "model.layers.*.mlp.up_proj.weight"),
    rename("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
    rename("decoder.final_layernorm.weight", "model.norm.weight"),
    # Absent on both sides when embeddings are tied.
    rename("output_layer.weight", "lm_head.weight"),
))
