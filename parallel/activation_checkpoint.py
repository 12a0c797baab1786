"""Activation checkpointing per transformer block: full recompute, or selective (keep matmul and
attention outputs, recompute the cheap element-wise ops; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models")."""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from trainer.torch_compat import HAS_GROUPED_MM

# Outputs worth keeping: expensive to recompute, and the bulk of a block's FLOPs.
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    # The kernels behind model.attention_backend=flex and varlen (trainer/model/attention.py): the flex
    # higher-order op (torch redirects it to the selective-checkpoint modes), varlen's custom op and the
    # flash/cuDNN forwards it calls.
    torch.ops.higher_order.flex_attention,
    torch.ops.aten._flash_attention_forward.default,
}
try:  # varlen's op is registered by importing its module; older torch releases lack some of these ops
    import torch.nn.attention.varlen  # noqa: F401

    _SAVE.add(torch.ops.torch_attn._varlen_attn.default)
    _SAVE.add(torch.ops.aten._cudnn_attention_forward.default)
except (ImportError, AttributeError):
    pass
if HAS_GROUPED_MM:  # the MoE expert GEMMs (trainer/model/moe.py), where torch has it
    _SAVE.add(torch.ops.aten._grouped_mm.default)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Wraps every block of model.decoder.layers in place. Wrapping adds a `_checkpoint_wrapped_module`
    level to parameter names; state_dict() strips it, and meshtron's name-based code uses clean_fqn()."""
    if mode == "none":
        return
    context_fn = partial(create_selective_checkpoint_contexts, _policy) if mode == "selective" else None
    layers = model.decoder.layers
    for name, block in list(layers.items()):
        kwargs = {"context_fn": context_fn} if context_fn else {}
        layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
