"""The MoE part of an HF config.json <-> ModelConfig.moe, per family (qwen3_moe, mixtral, qwen2_moe).

Read from the keys as Hub checkpoints have them (Qwen's `num_experts`, Mixtral's `num_local_experts`; transformers
5 writes `num_local_experts` for both) and written as the installed transformers' config class writes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.moe_config import MoEConfig


@dataclass(frozen=True)
class MoEKeys:
    """How one HF family spells its MoE settings."""

    experts: str  # the key save_pretrained writes for the number of experts
    expert_ffn: str  # the routed experts' width
    norm_topk: Optional[str]  # norm_topk_prob's key; None: the top-k weights are always renormalised
    sparse_layers: bool  # decoder_sparse_step / mlp_only_layers choose the MoE layers; else every layer is MoE
    shared_expert: bool  # shared_expert_intermediate_size, always with its sigmoid gate


HF_MOE = {
    "qwen3_moe": MoEKeys("num_experts", "moe_intermediate_size", "norm_topk_prob", True, False),
    "mixtral": MoEKeys("num_local_experts", "intermediate_size", None, False, False),
    "qwen2_moe": MoEKeys("num_experts", "moe_intermediate_size", "norm_topk_prob", True, True),
}


def moe_from_hf(hf: Mapping[str, Any], defaults: Any, family: str, base: MoEConfig, num_layers: int) -> MoEConfig:
    """ModelConfig.moe of an HF config (`defaults`: the family's transformers config, for keys the file omits).
    Settings HF has no key for (z-loss, capacity, GEMM path) and an explicit moe_aux_loss_coeff stay `base`'s."""
    keys = HF_MOE.get(family)
    if keys is None:
        return MoEConfig()

    def get(*names: str) -> Any:
        for name in names:
            if name in hf:
                return hf[name]
        return getattr(defaults, names[0], None)

    experts = get("num_experts", "num_local_experts")
    if not experts:
        raise ConfigError(f"HF {family} config has num_experts={experts}; a dense model is another family")
    jitter = get("router_jitter_noise")
    if jitter:
        raise ConfigError(f"HF router_jitter_noise={jitter} is not supported (training-time noise on the router "
                          f"input); set it to 0")
    freq = None
    if keys.sparse_layers:
        step, dense = int(get("decoder_sparse_step")), set(get("mlp_only_layers") or [])
        freq = [0 if i in dense or (i + 1) % step else 1 for i in range(num_layers)]
    shared = int(get("shared_expert_intermediate_size") or 0) if keys.shared_expert else 0
    return dataclasses.replace(
        base,
        num_moe_experts=int(experts),
        moe_router_topk=int(get("num_experts_per_tok")),
        moe_ffn_hidden_size=int(get(keys.expert_ffn)),
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared),
        moe_layer_freq=None if freq is None or all(freq) else freq,
        moe_router_pre_softmax=keys.norm_topk is not None and not get(keys.norm_topk),
        moe_aux_loss_coeff=(float(get("router_aux_loss_coef")) if base.moe_aux_loss_coeff is None
                            else base.moe_aux_loss_coeff),
    )


def moe_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The HF config keys of cfg.moe for `family`, or a ConfigError naming what the family cannot say."""
    keys, m = HF_MOE.get(family), cfg.moe
    if keys is None:
        if m.enabled:
            raise ConfigError(f"model.moe.num_moe_experts={m.num_moe_experts} cannot be written as an HF {family} "
                              f"config; use model.family {' or '.join(HF_MOE)}")
        return {}
    if not m.enabled:
        raise ConfigError(f"model.family={family} is a mixture of experts but model.moe.num_moe_experts is null")
    out: dict[str, Any] = {keys.experts: m.num_moe_experts, "num_experts_per_tok": m.moe_router_topk,
                           keys.expert_ffn: m.expert_ffn(cfg.ffn_hidden_size), "router_aux_loss_coef": m.aux_loss_coeff}
    if keys.norm_topk:
        out[keys.norm_topk] = not m.moe_router_pre_softmax
    elif m.moe_router_pre_softmax:
        raise ConfigError(f"model.moe.moe_router_pre_softmax=true cannot be written as HF {family}: its top-k "
                          f"weights are always renormalised")
    if keys.sparse_layers:
        out["decoder_sparse_step"], out["mlp_only_layers"] = sparse_step_keys(m.moe_layer_freq, cfg.num_layers)
    elif m.moe_layer_freq is not None and not all(m.moe_layer_freq):
        raise ConfigError(f"model.moe.moe_layer_freq={m.moe_layer_freq} has dense layers, which HF {family} "
                          f"cannot have (every layer is MoE)")
    if keys.shared_expert:
        if not (m.moe_shared_expert_intermediate_size and m.moe_shared_expert_gate):
            raise ConfigError(f"HF {family} has a gated shared expert: set model.moe."
                              f"moe_shared_expert_intermediate_size and moe_shared_expert_gate=true")
        out["shared_expert_intermediate_size"] = m.moe_shared_expert_intermediate_size
    elif m.moe_shared_expert_intermediate_size:
        raise ConfigError(f"model.moe.moe_shared_expert_intermediate_size={m.moe_shared_expert_intermediate_size}"
                          f" cannot be written as HF {family} (no shared expert); use qwen2_moe")
    return out


def sparse_step_keys(freq: Optional[list[int]], num_layers: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) giving MoE exactly where `freq` has a 1: the step whose MoE
    layers cover them with the fewest exceptions, so a checkpoint's own keys come back as they were."""
    if freq is None:
        return 1, []
    moe = {i for i, f in enumerate(freq) if f}
    best = None
    for step in range(1, num_layers + 1):
        by_step = {i for i in range(num_layers) if (i + 1) % step == 0}
        if moe <= by_step and (best is None or len(by_step - moe) < len(best[1])):
            best = (step, sorted(by_step - moe))
    return best
