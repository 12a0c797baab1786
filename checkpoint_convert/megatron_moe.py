"""A mixture-of-experts model's settings in a Megatron-LM checkpoint's args (legacy rank files and torch_dist's
common.pt alike) <-> meshtron's ModelConfig.moe, and the expert-parallel layout of legacy files.

The args are Megatron-LM's own (megatron/training/arguments.py; megatron-core's TransformerConfig fields of the
same names, but `num_experts` for num_moe_experts): num_experts, moe_router_topk, moe_ffn_hidden_size,
moe_layer_freq (1 or one 0/1 per layer), moe_shared_expert_intermediate_size, moe_shared_expert_gate,
moe_router_pre_softmax, moe_aux_loss_coeff, moe_z_loss_coeff, moe_router_load_balancing_type, moe_grouped_gemm,
moe_token_dispatcher_type, expert_model_parallel_size, expert_tensor_parallel_size.

Scales. megatron-core's load-balancing loss is normalised to 1 at perfect balance, meshtron's (HF's) to top_k
(trainer/model/moe.py), so the same objective takes moe_aux_loss_coeff = meshtron's x top_k there. meshtron's
statistics are per sequence, which is megatron-core's "seq_aux_loss". The router's softmax runs in fp32 in both
(moe_router_dtype fp32). The exact meshtron coefficient is kept beside them (meshtron_moe_aux_loss_coeff), so a
round trip gives it back bit for bit.

Legacy files with expert parallelism (megatron/training/checkpointing.py, get_checkpoint_name): one file per
(TP, PP, EP) rank, `mp_rank_TT[_PPP]_EEE`; EP rank k holds experts [k E/EP, (k + 1) E/EP) numbered from 0
(`local_experts.<j>` / `weight<j>`), everything else replicated over EP. Experts split over TP as the dense MLP
does (expert_tensor_parallel_size = TP, megatron-core's default); another expert TP is refused.
"""

from __future__ import annotations

import argparse
from typing import Any

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.moe_config import MoEConfig

__all__ = ["moe_args", "moe_from_args", "moe_family", "check_expert_layout", "same_moe", "expert_tp"]


def moe_args(cfg: ModelConfig, tp: int, ep: int, spec: str) -> dict[str, Any]:
    """The MoE entries of Megatron-LM's args for `cfg` (empty for a dense model: its args stay as they were)."""
    m = cfg.moe
    if not m.enabled:
        return {}
    k = m.moe_router_topk
    return dict(
        num_experts=m.num_moe_experts, moe_router_topk=k, moe_ffn_hidden_size=m.expert_ffn(cfg.ffn_hidden_size),
        moe_layer_freq=1 if m.moe_layer_freq is None else list(m.moe_layer_freq),
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=bool(m.moe_shared_expert_gate), moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_score_function="softmax", moe_router_dtype="fp32", moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=m.aux_loss_coeff * k,
        moe_z_loss_coeff=m.moe_z_loss_coeff or None, moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_token_drop_policy=m.moe_drop_policy, moe_grouped_gemm=spec == "te",
        # alltoall is Megatron-LM's choice with expert parallelism; allgather its default without
        moe_token_dispatcher_type="alltoall" if ep > 1 else "allgather",
        expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
        meshtron_moe_aux_loss_coeff=m.moe_aux_loss_coeff,
    )


def moe_from_args(args: argparse.Namespace, num_layers: int) -> MoEConfig:
    """ModelConfig.moe of a checkpoint's args; ConfigError for MoE settings meshtron's model does not have."""
    def arg(key, default=None):
        value = getattr(args, key, default)
        return default if value is None else value

    experts = arg("num_experts")
    if not experts:
        return MoEConfig()
    for key, want in (("moe_router_score_function", "softmax"), ("moe_router_topk_scaling_factor", None),
                      ("moe_router_enable_expert_bias", False), ("moe_router_num_groups", None),
                      ("moe_latent_size", None), ("moe_input_jitter_eps", None)):
        if arg(key, want) != want:
            raise ConfigError(f"Megatron checkpoint has {key}={arg(key)!r}; meshtron's MoE supports only "
                              f"{key}={want!r} (a softmax top-k router, as Qwen3-MoE, Mixtral, Qwen2-MoE)")
    freq = arg("moe_layer_freq", 1)
    if isinstance(freq, int):  # Megatron's integer form: every freq-th layer from layer 0
        freq = [1 if i % freq == 0 else 0 for i in range(num_layers)]
    freq = [int(f) for f in freq]
    k = int(arg("moe_router_topk", 2))
    mine = getattr(args, "meshtron_moe_aux_loss_coeff", None)
    coeff = arg("moe_aux_loss_coeff", 0.0)
    if isinstance(coeff, (list, tuple)):  # one per load_balancing_type; meshtron has one balancing loss
        coeff = sum(coeff)
    shared = arg("moe_shared_expert_intermediate_size")
    return MoEConfig(
        num_moe_experts=int(experts), moe_router_topk=k,
        moe_ffn_hidden_size=arg("moe_ffn_hidden_size", args.ffn_hidden_size),  # unset: the dense width (Mixtral)
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=bool(shared and arg("moe_shared_expert_gate")),
        moe_layer_freq=None if all(freq) else freq, moe_router_pre_softmax=bool(arg("moe_router_pre_softmax")),
        moe_aux_loss_coeff=mine if mine is not None else float(coeff) / k,
        moe_z_loss_coeff=float(arg("moe_z_loss_coeff", 0.0)),
        moe_expert_capacity_factor=arg("moe_expert_capacity_factor"),
        moe_drop_policy=arg("moe_token_drop_policy", "probs"),
    )


def moe_family(args: argparse.Namespace, moe: MoEConfig) -> str:
    """The HF family a Megatron-LM MoE checkpoint is, from its architecture (meshtron's own record first)."""
    if getattr(args, "meshtron_family", None):
        return args.meshtron_family
    if moe.moe_shared_expert_intermediate_size:
        return "qwen2_moe"
    return "qwen3_moe" if getattr(args, "qk_layernorm", False) or moe.moe_layer_freq else "mixtral"


def check_expert_layout(cfg: ModelConfig, tp: int, ep: int, where: str = "") -> None:
    """EP divides the experts, and the experts' TP is the model's."""
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"{where}ep={ep!r} must be a positive integer")
    if ep > 1 and not cfg.moe.enabled:
        raise ConfigError(f"{where}ep={ep} needs a mixture-of-experts model; {cfg.family} is dense")
    if cfg.moe.enabled and cfg.moe.num_moe_experts % ep:
        raise ConfigError(f"{where}ep={ep} does not divide num_experts={cfg.moe.num_moe_experts}; every expert-"
                          f"parallel rank holds the same number of experts")
    if not cfg.moe.enabled:
        return
    for name, width in (("moe_ffn_hidden_size", cfg.moe.expert_ffn(cfg.ffn_hidden_size)),
                        ("moe_shared_expert_intermediate_size", cfg.moe.moe_shared_expert_intermediate_size or 0)):
        if width % tp:
            raise ConfigError(f"{where}{name}={width} is not divisible by tp={tp}; the experts split over the "
                              f"tensor-parallel ranks like the dense MLP")


def same_moe(a: MoEConfig, b: MoEConfig) -> list[str]:
    """What differs between two models' experts (the settings that change the tensors or the forward)."""
    fields = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
              "moe_shared_expert_gate", "moe_layer_freq", "moe_router_pre_softmax")
    return [f"moe.{f}: config.json {getattr(a, f)} vs checkpoint {getattr(b, f)}" for f in fields
            if getattr(a, f) != getattr(b, f)]


def expert_tp(args: argparse.Namespace, tp: int) -> None:
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if getattr(args, "num_experts", None) and etp not in (None, tp):
        raise ConfigError(f"Megatron checkpoint has expert_tensor_parallel_size={etp} and tensor_model_parallel_"
                          f"size={tp}; only experts split like the dense layers (the same TP) are supported")
