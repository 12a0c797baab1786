"""meshtron <-> Megatron-LM (megatron-core GPTModel) names, on full (unsharded, unpadded) tensors.

meshtron already uses megatron-core's names, so nearly every rule is the identity. Two things differ:

- SwiGLU fc1: meshtron keeps gate and up apart; megatron-core fuses them as `linear_fc1 = [gate; up]`.
  That is the TP=1 layout; at TP>1 each rank holds [gate_r; up_r], which `TP_SPLITS` below describes.
- Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms into the following linear
  (`TELayerNormColumnParallelLinear`), so their weights are called `linear_qkv.layer_norm_weight` and
  `linear_fc1.layer_norm_weight`. q/k layernorms and the final norm keep their names.

The tables do not depend on the model family: a family only decides which of the names exist.

Mixture-of-experts layers (megatron-core's MoELayer) add the router (`mlp.router.weight`, as is), the shared expert
(`mlp.shared_experts.linear_fc1` = [gate; up], `linear_fc2`, `gate_weight`) and the routed experts, which meshtron
stacks on dim 0 and megatron-core names in one of three ways (EXPERTS): SequentialMLP's
`mlp.experts.local_experts.<e>.linear_fc1.weight` = [gate[e]; up[e]] (the local spec, legacy files), TEGroupedMLP's
`mlp.experts.linear_fc1.weight<e>` (the TE spec with grouped GEMM, legacy files), and torch_dist's global
`mlp.experts.experts.linear_fc1.weight` [E, 2F, H] under either. An MoE layer's pre-MLP norm cannot be fused into
a linear, so under the TE spec it keeps `pre_mlp_layernorm.weight`; the local spec's torch_dist key map still
files it as `mlp.linear_fc1.layer_norm_weight`. `megatron_units` picks the table per layer.

`TP_SPLITS` says how each Megatron tensor is laid out over tensor-parallel ranks (megatron-core's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding); PP placement is by layer index alone.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from checkpoint_convert.mapping import MappingTable, Rule, Unit, rename, stack_experts
from trainer.config import ModelConfig

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
MEGATRON_TE = MEGATRON_LOCAL.with_rules(
    rename(f"{_LAYER}.input_layernorm.weight", f"{_LAYER}.self_attention.linear_qkv.layer_norm_weight"),
    rename(f"{_LAYER}.pre_mlp_layernorm.weight", f"{_LAYER}.mlp.linear_fc1.layer_norm_weight"),
)

SPECS = {"local": MEGATRON_LOCAL, "te": MEGATRON_TE}

# ------------------------------------------------------------------------------------ mixture of experts

_OURS_E, _SHARED = f"{_LAYER}.mlp.experts", f"{_LAYER}.mlp.shared_experts"


def fuse_expert_gate_up(gate: str, up: str, fused: str) -> Rule:
    """Our stacked gate and up [E, F, H] <-> one fused [gate[e]; up[e]] per expert (`#` in `fused`)."""
    return Rule(
        (gate, up), (fused,), per_expert=True,
        to_theirs=lambda t, cfg: tuple(torch.cat([g, u]) for g, u in zip(t[0].unbind(0), t[1].unbind(0))),
        to_ours=lambda t, cfg: tuple(torch.stack([e.chunk(2, dim=0)[i] for e in t]) for i in (0, 1)),
    )


def _fuse_stacked_gate_up(gate: str, up: str, fused: str) -> Rule:
    """Our stacked gate and up [E, F, H] <-> torch_dist's [E, 2F, H], each expert [gate[e]; up[e]]."""
    return Rule(
        (gate, up), (fused,),
        to_theirs=lambda t, cfg: (torch.cat([t[0], t[1]], dim=1),),
        to_ours=lambda t, cfg: tuple(p.clone(memory_format=torch.contiguous_format) for p in t[0].chunk(2, dim=1)),
    )


MOE_RULES = _same(f"{_LAYER}.mlp.router.weight", f"{_SHARED}.linear_fc2.weight", f"{_SHARED}.gate_weight") + (
    fuse_gate_up(f"{_SHARED}.linear_fc1_gate.weight", f"{_SHARED}.linear_fc1_up.weight",
                 f"{_SHARED}.linear_fc1.weight"),
)
_GATE, _UP, _FC2 = (f"{_OURS_E}.{n}.weight" for n in ("linear_fc1_gate", "linear_fc1_up", "linear_fc2"))
# How megatron-core names the routed experts: "sequential" (SequentialMLP), "grouped" (TEGroupedMLP), "dist".
EXPERTS = {
    "sequential": (fuse_expert_gate_up(_GATE, _UP, f"{_OURS_E}.local_experts.#.linear_fc1.weight"),
                   stack_experts(_FC2, f"{_OURS_E}.local_experts.#.linear_fc2.weight")),
    "grouped": (fuse_expert_gate_up(_GATE, _UP, f"{_OURS_E}.linear_fc1.weight#"),
                stack_experts(_FC2, f"{_OURS_E}.linear_fc2.weight#")),
    "dist": (_fuse_stacked_gate_up(_GATE, _UP, f"{_OURS_E}.experts.linear_fc1.weight"),
             rename(_FC2, f"{_OURS_E}.experts.linear_fc2.weight")),
}
# The legacy files' expert names under each layer spec (--spec te means TEGroupedMLP, moe_grouped_gemm=True).
SPEC_EXPERTS = {"local": "sequential", "te": "grouped"}


def layer_tables(spec: str, experts: str) -> tuple[MappingTable, MappingTable]:
    """(dense layers' table, MoE layers' table); experts="dist": torch_dist's names (TE-style norms)."""
    dense = MEGATRON_TE if experts == "dist" else SPECS[spec]
    moe = dense.with_rules(*MOE_RULES, *EXPERTS[experts])
    if spec == "te":  # TE's MoE layer has a TENorm of its own before the router
        moe = moe.with_rules(rename(f"{_LAYER}.pre_mlp_layernorm.weight", f"{_LAYER}.pre_mlp_layernorm.weight"))
    return dense, moe


def megatron_units(shapes, cfg: ModelConfig, spec: str, experts: str | None = None) -> list[Unit]:
    """The Megatron-table units of our parameters `shapes` (names in model order), MoE layers by the MoE table.
    experts: EXPERTS' key (default: the legacy files' names for `spec`)."""
    dense, moe = layer_tables(spec, experts or SPEC_EXPERTS[spec])
    if not cfg.moe.enabled:
        return dense.units(shapes)
    units, run, run_moe = [], [], False
    for name in list(shapes) + [None]:  # consecutive names of one kind of layer at a time, keeping their order
        at = layer_of(name) if name is not None else None
        is_moe = at is not None and cfg.moe.is_moe_layer(at[0])
        if name is None or (run and is_moe != run_moe):
            units += (moe if run_moe else dense).units(run, cfg)
            run = []
        run_moe = is_moe
        run.append(name)
    return units


_EXPERT_NAME = re.compile(r"(.*\.mlp\.experts\.)(?:local_experts\.(\d+)\.(.+)|(linear_fc[12]\.weight)(\d+))\Z")


def expert_of(name: str) -> tuple[int, Callable[[int], str]] | None:
    """(expert index, index -> the same name for another index) of a legacy per-expert name, else None."""
    m = _EXPERT_NAME.match(name)
    if m is None:
        return None
    head, seq, rest, grouped, index = m.groups()
    if seq is not None:
        return int(seq), lambda e: f"{head}local_experts.{e}.{rest}"
    return int(index), lambda e: f"{head}{grouped}{e}"


# Modules whose state dict carries an `_extra_state` entry (None for the local spec; TE keeps FP8 metadata
# there). Megatron saves them and loads with strict=True, so a converted checkpoint carries them too.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2", "output_layer")
_EXTRA_STATE = re.compile(r"(self_attention\.linear_qkv|self_attention\.linear_proj|linear_fc[12]|"
                          r"\Aoutput_layer)\Z")


def has_extra_state(module: str) -> bool:
    """Whether megatron-core's module of that name (a legacy file's) has an `_extra_state` entry: the attention
    and MLP linears, each expert's and the shared expert's (TEGroupedMLP: one per fc, not per expert)."""
    return _EXTRA_STATE.search(module) is not None

# ------------------------------------------------------------------------------------ TP placement

REPLICATED, COLUMN, ROW, GATED_COLUMN, VOCAB = "replicated", "column", "row", "gated_column", "vocab"

# Checked in order; the first pattern found at the end of the name wins. Everything else (norms, the router, the
# shared expert's gate) is replicated. Experts split over TP like the dense MLP (expert_tensor_parallel_size = TP).
TP_SPLITS = tuple((re.compile(p + r"\Z"), kind) for p, kind in (
    (r"embedding\.word_embeddings\.weight", VOCAB),   # VocabParallelEmbedding: padded rows, split on dim 0
    (r"output_layer\.weight", VOCAB),                  # ColumnParallelLinear over the padded vocabulary
    (r"\.self_attention\.linear_qkv\.weight", COLUMN),  # rows interleaved per query group: whole groups per rank
    (r"\.self_attention\.linear_qkv\.bias", COLUMN),
    (r"\.linear_fc1\.weight\d*", GATED_COLUMN),         # rank r holds [gate_r; up_r] (dense, shared, each expert)
    (r"\.self_attention\.linear_proj\.weight", ROW),   # RowParallelLinear: split on the input dim
    (r"\.linear_fc2\.weight\d*", ROW),
))


def tp_split(name: str) -> str:
    for pattern, kind in TP_SPLITS:
        if pattern.search(name):
            return kind
    return REPLICATED


_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)\Z")


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, rest of the name) for a per-layer tensor, None for embedding/final norm/output."""
    m = _LAYER_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
