"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence parallelism (Korthikanti et al. 2022),
a vocabulary-parallel embedding and output layer, and loss-parallel cross-entropy, as DTensor plans.

The plans are applied from outside the single-device model with ``parallelize_module``, one short plan per
block as torchtitan does. Per transformer layer, with sequence parallelism (SP):

    hidden [B, S/tp, h] -> norm (SP) -> all-gather -> linear_qkv (colwise) -> attention on local heads
        -> linear_proj (rowwise) -> reduce-scatter -> + residual -> norm (SP) -> all-gather
        -> fc1 gate/up (colwise) -> fc2 (rowwise) -> reduce-scatter -> + residual

Without SP the hidden state is full on every rank and the rowwise outputs are all-reduced instead.
Every parameter becomes a DTensor on the tp mesh (norms as Replicate), so FSDP2, gradient clipping and
DCP see one kind of parameter. The vocabulary is split over tp for the embedding (rowwise: each rank looks
up its rows, the partial sums are reduced) and for the logits (colwise on the same Shard(0) layout, which
is what lets tied embeddings share one DTensor); with loss parallelism the logits stay sharded on the
vocabulary dim and the cross-entropy runs on the shards (torch's ``loss_parallel``), so no rank ever holds
[B, S, vocab].
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from trainer.model.moe import MoELayer


# Set on a model by apply_tensor_parallel; read by vocab_parallel_loss. An attribute (not a parameter or buffer),
# so it never reaches state_dict, and it survives torch.compile/FSDP wrapping (they keep the module object).
_LOSS_PARALLEL_ATTR = "_tp_loss_parallel"


# ------------------------------------------------------------------------------ config-time checks


# ------------------------------------------------------------------------------------------ styles


class ReplicateParallel(ParallelStyle):
    """A module whose parameters are Replicate DTensors and whose input is the full activation.

    Used for the norms when sequence parallelism is off: torch has no style for it, and keeping them plain
    tensors would mix tensors and DTensors in one model. The output is a local tensor so that the next
    colwise layer's input annotation (Replicate) all-reduces the input gradient once, Megatron's `f`
    operator; the norm's own weight gradient is then computed from full, already reduced gradients.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_params(name, mod, mesh):
            for p_name, param in mod.named_parameters(recurse=False):
                # Every rank built the same weights (or meta): no broadcast needed.
                mod.register_parameter(p_name, nn.Parameter(DTensor.from_local(param, mesh, [Replicate()],
                                                                               run_check=False),
                                                            requires_grad=param.requires_grad))

        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

        def to_local(mod, outputs, mesh):
            return outputs.to_local()

        return distribute_module(module, device_mesh, replicate_params, to_dtensor, to_local)


class VocabParallelOutput(ParallelStyle):
    """The untied output layer's weight sharded over the vocabulary (rows), like the embedding's.

    ``GPTModel.lm_head`` calls the weight directly (tied models have no output module at all), so this
    only places the weight; lm_head sees a DTensor weight and produces vocab-sharded logits.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        weight = module.weight
        sharded = distribute_tensor(weight, device_mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter("weight", nn.Parameter(sharded, requires_grad=weight.requires_grad))
        return module


class LoraColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a base carrying LoRA adapters (trainer/lora.py): the base's rows and each B's rows
    sharded alike (Shard(0)), each A replicated, so the adapter's output is sharded like the base's. Frozen
    parameters stay frozen."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Replicate() if pname.startswith("lora_A") else Shard(0)
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))


class LoraRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a base carrying LoRA adapters: the base's columns and each A's columns sharded alike
    (Shard(1)), B replicated (the adapter's output is then a partial sum, reduced with the base's); a bias is
    replicated as torch's style has it."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = (Shard(1) if pname == "weight" or pname.startswith("lora_A") else Replicate())
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))


# ------------------------------------------------------------------------------------------- plans


def _norm_style(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel() if sequence_parallel else ReplicateParallel()


def _layer_plan(layer: nn.Module, sequence_parallel: bool,
                colwise: type = ColwiseParallel, rowwise: type = RowwiseParallel) -> dict[str, ParallelStyle]:
    """A decoder layer's plan; `colwise` and `rowwise` are the styles of its linear layers (torchao's float8
    styles under tensorwise fp8: parallel/float8.py tp_styles)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "input_layernorm": _norm_style(sequence_parallel),
        # Rows of the fused QKV are ordered by query group, so a dim-0 shard hands out whole groups.
        "self_attention.linear_qkv": colwise(input_layouts=seq),
        "self_attention.linear_proj": rowwise(output_layouts=seq),
        "pre_mlp_layernorm": _norm_style(sequence_parallel),
    }
    if isinstance(layer.mlp, MoELayer):
        # An MoE layer is not split over tp: under sequence parallelism (required, parallel/dims.py) each rank
        # routes its own S/tp tokens through whole experts, like a data-parallel rank; FSDP shards its weights
        # over data x tp ranks, or under ep the experts over dp_shard_mod_ep (parallel/expert_parallel.py).
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Shard(1), None), use_local_input=True,
            output_layouts=Shard(1), desired_output_layouts=Shard(1))
    else:
        plan.update({
            "mlp.linear_fc1_gate": colwise(input_layouts=seq),
            "mlp.linear_fc1_up": colwise(input_layouts=seq),
            "mlp.linear_fc2": rowwise(output_layouts=seq),
        })
    if layer.self_attention.q_layernorm is not None:
        # Qwen3's per-head norms see this rank's heads, [B, S, heads_local, hd]: declaring dim 2 sharded
        # makes the weight a Replicate DTensor whose gradient (a partial sum over local heads) is summed
        # over tp; the output goes back to a local tensor for the attention math.
        for name in ("self_attention.q_layernorm", "self_attention.k_layernorm"):
            plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          loss_parallel: bool = True,
                          styles: tuple[type, type] = (ColwiseParallel, RowwiseParallel)) -> None:
    """Shard a GPTModel (or a pipeline stage of one: absent parts are skipped) over ``tp_mesh`` in place.

    Inputs (tokens, position_ids, labels) stay full on every tp rank. With ``loss_parallel`` the model
    returns logits as a DTensor sharded on the vocabulary dim: compute the loss and call backward inside
    :func:`vocab_parallel_loss`. Without it the logits are gathered to a full local tensor.

    Gradients are DTensors whose placement may differ from their parameter's: norm weights get
    Partial(sum) (summed lazily on first use, or by FSDP2's reduce-scatter), the embedding Replicate.
    AdamW and clip_grad_norm_ handle both (see tests/distributed/test_tensor_parallel.py).
    """
    setattr(model, _LOSS_PARALLEL_ATTR, loss_parallel)
    seq = Shard(1) if sequence_parallel else Replicate()
    # src_data_rank=None: every rank builds the same model from the same seed (or on meta), so each
    # slices its part locally instead of receiving it from rank 0.
    if model.embedding is not None:
        parallelize_module(model.embedding, tp_mesh, {
            # Rowwise on an embedding = vocab-parallel: rows outside this rank's range look up zeros, and
            # the partial results are summed (reduce-scattered straight to sequence shards under SP).
            "word_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        }, src_data_rank=None)
    for layer in model.decoder.layers.values():
        parallelize_module(layer, tp_mesh, _layer_plan(layer, sequence_parallel, *styles), src_data_rank=None)

    if model.decoder.final_layernorm is None:  # a pipeline stage before the last: no logits here
        return
    # Under SP the final norm returns a Shard(1) DTensor; lm_head all-gathers it before the vocab matmul.
    parallelize_module(model.decoder, tp_mesh, {"final_layernorm": _norm_style(sequence_parallel)},
                       src_data_rank=None)
    if model.output_layer is not None:  # untied, or a last pipeline stage's copy of tied embeddings
        parallelize_module(model.output_layer, tp_mesh, VocabParallelOutput())
    if not loss_parallel:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(-1), desired_output_layouts=Replicate(), use_local_output=True))


def vocab_parallel_loss(model: nn.Module) -> contextlib.AbstractContextManager:
    """Wrap the cross-entropy AND its backward: inside torch's ``loss_parallel``, cross_entropy on
    vocab-sharded logits computes max/sum-exp/target-logit with all-reduces over tp instead of gathering."""
    return loss_parallel() if getattr(model, _LOSS_PARALLEL_ATTR, False) else contextlib.nullcontext()
