"""Qwen3-MoE <-> meshtron: Qwen3's attention (q/k norms), and in MoE layers a router and per-expert SwiGLUs.

Hub checkpoints (and transformers 5's save_pretrained, which converts back on save) store one tensor per
expert, `mlp.experts.<e>.{gate,up,down}_proj.weight`, and the router as `mlp.gate.weight`; meshtron stacks the
experts on dim 0. Dense layers (mlp_only_layers, decoder_sparse_step) keep Qwen3's MLP names.
"""

from checkpoint_convert.mapping import rename, stack_experts
from checkpoint_convert.models.qwen3 import QWEN3

_MLP = "model.layers.*.mlp"

MOE_RULES = (
    rename("decoder.layers.*.mlp.router.weight", f"{_MLP}.gate.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc1_gate.weight", f"{_MLP}.experts.#.gate_proj.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc1_up.weight", f"{_MLP}.experts.#.up_proj.weight"),
    stack_experts("decoder.layers.*.mlp.experts.linear_fc2.weight", f"{_MLP}.experts.#.down_proj.weight"),
)

QWEN3_MOE = QWEN3.with_rules(*MOE_RULES)
