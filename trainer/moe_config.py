"""Mixture-of-experts settings of a model (``model.moe.*``), named after megatron-core's arguments.

Kept apart from trainer/config.py (which holds it as ``ModelConfig.moe``) so the model schema stays short;
nothing here imports the rest of the config, so config.py can import it at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from trainer.errors import require

# HF's router_aux_loss_coef default for qwen3_moe, qwen2_moe and mixtral: the coefficient when neither the
# config nor the HF checkpoint gives one.
DEFAULT_AUX_LOSS_COEFF = 0.001
DROP_POLICIES = ("probs", "position")


@dataclass
class MoEConfig:
    """Routed experts replacing the dense MLP of some or all layers (see trainer/model/moe.py for the math).

    ``num_moe_experts=None`` is a dense model and every other field is ignored.
    """

    num_moe_experts: Optional[int] = None
    # Experts per token (Mixtral 2, Qwen3-30B-A3B 8).
    moe_router_topk: int = 2
    # Width of each routed expert's SwiGLU; None: model.ffn_hidden_size (Mixtral). Qwen's moe_intermediate_size.
    moe_ffn_hidden_size: Optional[int] = None
    # Width of the shared expert every token also goes through (Qwen2-MoE); None: no shared expert.
    moe_shared_expert_intermediate_size: Optional[int] = None
    # Scale the shared expert's output by sigmoid(x . gate_weight) per token (Qwen2-MoE's shared_expert_gate).
    moe_shared_expert_gate: bool = False
    # Megatron's list form of moe_layer_freq: one entry per layer, 1 = MoE, 0 = dense MLP; None: every layer.
    # (HF's decoder_sparse_step / mlp_only_layers are read into it; Megatron's integer form N means
    # [1 if i % N == 0 else 0 ...], HF's decoder_sparse_step N means (i + 1) % N == 0: the list says which.)
    moe_layer_freq: Optional[list[int]] = None
    # false: the top-k probabilities are renormalised to sum to 1 (Mixtral; Qwen's norm_topk_prob=true);
    # true: softmax over all experts, the top k kept as they are (Qwen's norm_topk_prob=false).
    moe_router_pre_softmax: bool = False
    # Load-balancing loss coefficient (HF's router_aux_loss_coef); None: the HF checkpoint's value, else 0.001.
    # The loss's scale is HF's (E * sum f_e P_e, k at perfect balance), which is top_k times megatron-core's.
    moe_aux_loss_coeff: Optional[float] = None
    # Router z-loss coefficient (ST-MoE, Zoph et al. 2022: mean of logsumexp(logits)^2); 0 turns it off.
    moe_z_loss_coeff: float = 0.0
    # Expert capacity per sequence = ceil(factor * seq_len * top_k / experts); assignments past it are dropped.
    # None: dropless (every assignment computed).
    moe_expert_capacity_factor: Optional[float] = None
    # Which assignments a full expert drops: the lowest router probabilities (probs) or the latest tokens.
    # megatron-core's moe_token_drop_policy.
    moe_drop_policy: str = "probs"
    # torch._grouped_mm for the expert matmuls where the device and dtype have it; false: a loop over experts.
    moe_grouped_gemm: bool = True

    @property
    def enabled(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def aux_loss_coeff(self) -> float:
        return DEFAULT_AUX_LOSS_COEFF if self.moe_aux_loss_coeff is None else self.moe_aux_loss_coeff

    def expert_ffn(self, ffn_hidden_size: int) -> int:
        return self.moe_ffn_hidden_size or ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.enabled and (self.moe_layer_freq is None or bool(self.moe_layer_freq[layer]))

    def moe_layers(self, num_layers: int) -> list[int]:
        """Global indices of the MoE layers, in order (a layer's position here is its row in the step's
        router statistics)."""
        return [i for i in range(num_layers) if self.is_moe_layer(i)]

    def capacity(self, seq_len: int) -> Optional[int]:
        """Assignments each expert takes per sequence, None when dropless."""
        if self.moe_expert_capacity_factor is None:
            return None
        return math.ceil(self.moe_expert_capacity_factor * seq_len * self.moe_router_topk / self.num_moe_experts)

    def validate(self, num_layers: int) -> None:
        if not self.enabled:
            return
        e, k = self.num_moe_experts, self.moe_router_topk
        require(e >= 1, f"model.moe.num_moe_experts={e} must be >= 1 (null for a dense model)")
        require(1 <= k <= e, f"model.moe.moe_router_topk={k} must be in [1, model.moe.num_moe_experts={e}]")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.moe.{name}={value} must be positive (or null)")
        require(not self.moe_shared_expert_gate or self.moe_shared_expert_intermediate_size,
                 "model.moe.moe_shared_expert_gate=true needs model.moe.moe_shared_expert_intermediate_size "
                 "(there is no shared expert to gate)")
        if self.moe_layer_freq is not None:
            freq = list(self.moe_layer_freq)
            require(len(freq) == num_layers,
                     f"model.moe.moe_layer_freq has {len(freq)} entries but model.num_layers={num_layers}; "
                     f"give one 0 (dense) or 1 (MoE) per layer")
            require(set(freq) <= {0, 1}, f"model.moe.moe_layer_freq={freq} may hold only 0 (dense) and 1 (MoE)")
            require(1 in freq, f"model.moe.moe_layer_freq={freq} has no MoE layer; set "
                                f"model.moe.num_moe_experts=null for a dense model")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"model.moe.{name}={value} must be >= 0")
        cf = self.moe_expert_capacity_factor
        require(cf is None or cf > 0, f"model.moe.moe_expert_capacity_factor={cf} must be positive "
                                       f"(or null: dropless)")
        require(self.moe_drop_policy in DROP_POLICIES,
                 f"model.moe.moe_drop_policy={self.moe_drop_policy!r} is not supported; expected "
                 f"one of {list(DROP_POLICIES)}")
