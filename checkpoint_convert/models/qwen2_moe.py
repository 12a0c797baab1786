"""Qwen2-MoE <-> meshtron: Qwen2's attention (q/k/v biases), Qwen3-MoE's expert names, plus a shared expert
(`mlp.shared_expert.*`) scaled per token by sigmoid(`mlp.shared_expert_gate`)."""

from checkpoint_convert.mapping import rename
from checkpoint_convert.models.qwen2 import QWEN2
from checkpoint_convert.models.qwen3_moe import MOE_RULES

_OURS, _THEIRS = "decoder.layers.*.mlp.shared_experts", "model.layers.*.mlp.shared_expert"

QWEN2_MOE = QWEN2.with_rules(
    *MOE_RULES,
    rename(f"{_OURS}.linear_fc1_gate.weight", f"{_THEIRS}.gate_proj.weight"),
    rename(f"{_OURS}.linear_fc1_up.weight", f"{_THEIRS}.up_proj.weight"),
    rename(f"{_OURS}.linear_fc2.weight", f"{_THEIRS}.down_proj.weight"),
    rename(f"{_OURS}.gate_weight", "model.layers.*.mlp.shared_expert_gate.weight"),
)
