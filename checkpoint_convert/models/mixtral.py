"""Mixtral <-> meshtron: Mistral's attention, every layer an MoE block under Mixtral's own names.

Hub checkpoints store `block_sparse_moe.gate.weight` (the router) and one tensor per expert,
`block_sparse_moe.experts.<e>.{w1 (gate), w3 (up), w2 (down)}.weight` (transformers 5 fuses them on load and
splits them again on save); meshtron stacks the experts on dim 0.
"""

from checkpoint_convert.mapping import rename, stack_experts
from checkpoint_convert.models.mistral import MISTRAL

_MOE = "model.layers.*.block_sparse_moe"

MIXTRAL = MISTRAL.with_rules(
    rename("decoder.layers.*.mlp.router.weight", f"{_MOE}.gate.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc1_gate.weight", f"{_MOE}.experts.#.w1.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc1_up.weight", f"{_MOE}.experts.#.w3.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc2.weight", f"{_MOE}.experts.#.w2.weight"),
)
