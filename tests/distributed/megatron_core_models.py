"""megatron-core's GPTModel (local spec, CPU) built from a Megatron checkpoint's args, as Megatron-LM builds it, for
the tests that load converted checkpoints into it (test_megatron_core_load, test_megatron_torch_dist,
test_megatron_moe). Mixtures of experts get megatron-core's MoE layer spec (get_gpt_decoder_block_spec: SequentialMLP
experts, dense layers where moe_layer_freq says) at the initialized expert-parallel size, with the allgather token
dispatcher (alltoall's __init__ makes CUDA streams)."""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from trainer.model.shapes import padded_vocab_size


def core_gpt_model(args: argparse.Namespace, *, pad_vocab_for_run: bool = False, parallel_output: bool = True,
                   dropout: Optional[float] = None):
    """GPTModel for this rank at the initialized parallel_state's TP x PP, configured from `args`.

    pad_vocab_for_run: the vocabulary padded for this run's TP, as Megatron-LM does (it may hold more rows than
    the files), instead of the args' padded_vocab_size. parallel_output=False gathers the logits over TP.
    dropout: hidden and attention dropout (None: megatron-core's defaults)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    extra = {} if dropout is None else {"hidden_dropout": dropout, "attention_dropout": dropout}
    if getattr(args, "num_experts", None):
        extra.update(
            num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_layer_freq=args.moe_layer_freq,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate, moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_dtype=args.moe_router_dtype, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type, moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather", expert_model_parallel_size=ps.get_expert_model_parallel_world_size())
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=torch.nn.functional.silu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm, window_size=args.window_size,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True, params_dtype=args.params_dtype, pipeline_dtype=args.params_dtype, **extra)
    vocab = (padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, tp) if pad_vocab_for_run
             else args.padded_vocab_size)
    if cfg.num_moe_experts:
        spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=args.normalization)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    model = GPTModel(
        cfg, spec,
        vocab_size=vocab, max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), parallel_output=parallel_output,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor).eval()
    if args.use_rope_scaling and getattr(args, "meshtron_rope_scaling", None):
        # megatron-core hard-codes Llama 3.1's band edges; the tiny models' are their own
        rope = model.rotary_pos_emb
        base = 1.0 / (args.rotary_base ** (torch.arange(0, args.kv_channels, 2, dtype=torch.float32)
                                           / args.kv_channels))
        bands = {k: args.meshtron_rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                             "original_max_position_embeddings")}
        rope.inv_freq = rope._apply_scaling(base, **bands)
    return model
