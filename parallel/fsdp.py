"""FSDP2 (``fully_shard``) over the dp_shard x cp ranks, HSDP when dp_replicate > 1.

Each transformer block is its own FSDP unit (all-gathered just before use, freed after), then the root
module takes what is left (embedding, final norm, output layer). Gradients are reduced with SUM: the loss
is already divided by the global number of valid tokens, so they must be divided exactly once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    if precision in ("bf16", "fp8"):  # fp8: the linear layers' GEMMs in fp8, everything else as bf16
        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 master weights in the optimizer.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, dp_mesh, precision: str, reshard_after_forward: bool = True,
               moe_layer_mesh=None, expert_mesh=None) -> None:
    """dp_mesh: 1-D ("dp_shard_cp") for FSDP, or 2-D ("dp_replicate", "dp_shard_cp") for HSDP. MoE layers
    (parallel/expert_parallel.py): ``expert_mesh`` makes each layer's routed experts (DTensors over ep) their
    own unit over the data ranks outside the ep group; ``moe_layer_mesh`` (data x tp ranks) the layer's."""
    from parallel.expert_parallel import moe_layers

    mp = mixed_precision(precision)
    for block in model.decoder.layers.values():
        # Inner units first: a unit's parameters are those no unit inside it took.
        for layer in moe_layers(block):
            if expert_mesh is not None:
                fully_shard(layer.experts, mesh=expert_mesh, mp_policy=mp,
                            reshard_after_forward=reshard_after_forward)
            if moe_layer_mesh is not None:
                fully_shard(layer, mesh=moe_layer_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if model.embedding is not None and not model.config.tie_word_embeddings:
        # Its own unit (as torchtitan's apply_fsdp): gathered for the lookup and freed after it, instead of held
        # with the root through the whole forward and backward; a frozen one (LoRA) is never gathered in backward.
        # Tied, it shares its weight with the output layer and stays in the root.
        fully_shard(model.embedding, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # With factor 1 a plain SUM reduce-scatter does it; the default PREMUL_SUM is NCCL-only.
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Whether the next backward reduce-scatters (and, under HSDP, all-reduces) its gradients.

    Enabled on every micro-batch (parallel.fsdp_grad_sync=every_microbatch), each backward adds its reduced
    shard to the sharded gradient and frees the unsharded one, so a rank holds 1/dp_shard of the model's
    gradients between micro-batches. Disabled on all but the last (last_microbatch), FSDP keeps every
    unsharded gradient until the last backward reduces their sum once: fewer collectives, more memory."""
    for m in modules:
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled)
