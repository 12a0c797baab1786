"""meshtron <-> Megatron-LM (megatron-core GPTModel) names, on full (unsharded, unpadded) tensors.

meshtron already uses megatron-core's names, so nearly every rule is the identity. Two things differ:

- SwiGLU fc1: meshtron keeps gate and up apart; megatron-core fuses them as `linear_fc1 = [gate; up]`.
  That is the TP=1 layout; at TP>1 each rank holds [gate_r; up_r], which `TP_SPLITS` below describes.
- Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms into the following linear
  (`TELayerNormColumnParallelLinear`), so their weights are called `linear_qkv.layer_norm_weight` and
  `linear_fc1.layer_norm_weight`. q/k layernorms and the final norm keep their names.

The tables do not depend on the model family: a family only decides which of the names exist.

`TP_SPLITS` says how each Megatron tensor is laid out over tensor-parallel ranks (megatron-core's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding); PP placement is by layer index alone.
"""

from __future__ import annotations

import re

import torch

from checkpoint_convert.mapping import MappingTable, Rule, rename

_LAYER = "decoder.layers.*"


def fuse_gate_up(gate: str, up: str, fused: str) -> Rule:
    """Our separate gate and up projections <-> megatron-core's fused linear_fc1 = [gate; up] (TP=1)."""
    return Rule(
        (gate, up), (fused,),
        to_theirs=lambda t, cfg: (torch.cat([t[0], t[1]], dim=0),),
        to_ours=lambda t, cfg: tuple(p.clone(memory_format=torch.contiguous_format) for p in t[0].chunk(2, dim=0)),
    )


def _same(*names: str) -> tuple[Rule, ...]:
    return tuple(rename(n, n) for n in names)


# megatron-core's local spec (get_gpt_layer_local_spec): the names meshtron's model already has.
MEGATRON_LOCAL = MappingTable(_same(
    "embedding.word_embeddings.weight",
    f"{_LAYER}.input_layernorm.weight",
    f"{_LAYER}.self_attention.linear_qkv.weight",
    f"{_LAYER}.self_attention.linear_qkv.bias",
    f"{_LAYER}.self_attention.q_layernorm.weight",
    f"{_LAYER}.self_attention.k_layernorm.weight",
    f"{_LAYER}.self_attention.linear_proj.weight",
    f"{_LAYER}.pre_mlp_layernorm.weight",
    f"{_LAYER}.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
) + (
    fuse_gate_up(f"{_LAYER}.mlp.linear_fc1_gate.weight", f"{_LAYER}.mlp.linear_fc1_up.weight",
                 f"{_LAYER}.mlp.linear_fc1.weight"),
))

# megatron-core's Transformer Engine spec (get_gpt_layer_with_transformer_engine_spec).
MEGATRON_TE = MEGATRON_LOCAL.extend(
    rename(f"{_LAYER}.input_layernorm.weight", f"{_LAYER}.self_attention.linear_qkv.layer_norm_weight"),
    rename(f"{_LAYER}.pre_mlp_layernorm.weight", f"{_LAYER}.mlp.linear_fc1.layer_norm_weight"),
)

SPECS = {"local": MEGATRON_LOCAL, "te": MEGATRON_TE}

# Modules whose state dict carries an `_extra_state` entry (None for the local spec; TE keeps FP8 metadata
# there). Megatron saves them and loads with strict=True, so a converted checkpoint carries them too.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2", "output_layer")

# ------------------------------------------------------------------------------------ TP placement

REPLICATED, COLUMN, ROW, GATED_COLUMN, VOCAB = "replicated", "column", "row", "gated_column", "vocab"

# Checked in order; the first suffix that matches wins. Everything else (norms) is replicated.
TP_SPLITS = (
    ("embedding.word_embeddings.weight", VOCAB),   # VocabParallelEmbedding: padded rows, split on dim 0
    ("output_layer.weight", VOCAB),                # ColumnParallelLinear over the padded vocabulary
    (".self_attention.linear_qkv.weight", COLUMN),  # rows interleaved per query group: whole groups per rank
    (".self_attention.linear_qkv.bias", COLUMN),
    (".mlp.linear_fc1.weight", GATED_COLUMN),      # rank r holds [gate_r; up_r]
    (".self_attention.linear_proj.weight", ROW),   # RowParallelLinear: split on the input dim
    (".mlp.linear_fc2.weight", ROW),
)


def tp_split(name: str) -> str:
    for suffix, kind in TP_SPLITS:
        if name.endswith(suffix):
            return kind
    return REPLICATED


_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)\Z")


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) for a per-layer tensor, None for embedding/final norm/output."""
    m = _LAYER_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
