"""torch.compile per transformer layer and for the loss chunk (parallel.compile=true).

Each block of ``model.decoder.layers`` is compiled on its own with ``fullgraph=True``: every layer has the
same code, so dynamo traces it once and the other layers reuse that graph (parameters are graph inputs,
not constants), and the compile time does not grow with depth. A whole-model graph would also take in the
embedding, the pipeline split and FSDP's root hooks; a block is the unit torchtitan compiles too.

Where it sits in parallel/parallelize.py's order: after tensor/context parallelism (the block's forward
then holds DTensor ops and the CP attention module, which the graph takes as they are) and after
activation checkpointing (the checkpoint wrapper is what is compiled, so dynamo traces
torch.utils.checkpoint as a higher-order op and the recompute is part of the compiled backward); before
FSDP, whose all-gather/reshard hooks fully_shard then registers on the compiled block (checked on 2 gloo
ranks against one eager process: tests/integration/test_compile_training.py). Tensor parallelism + compile is
refused on CPU (check_compile).

``nn.Module.compile()`` compiles in place: parameter names keep no ``_orig_mod.`` level, so checkpoints,
converters and ``clean_fqn`` see the same FQNs with and without compile.

Shapes: micro-batches have a fixed [B, S], so nothing is marked dynamic. What varies per batch is the
token layout (document ids present or not, doc_lens [B, K] with K runs per row): each variant is a guard
miss and one more graph, and a size that changed once is made dynamic by dynamo's automatic dynamic
shapes, so a run settles after a few compiles.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import Config, device_type
from trainer.errors import ConfigError


def check_compile(cfg: Config, tp: int) -> None:
    """Refuse, before any process group or allocation, what this torch cannot compile here.

    Tensor parallelism on CPU: the compiled blocks' backward hands plain tensors where DTensor's redistribute
    backward expects DTensors (torch 2.13, CPU/gloo: "'Tensor' object has no attribute '_local_tensor'"),
    so training fails at the first backward. CUDA runs are not refused here (torchtitan compiles TP blocks on
    CUDA); tests/gpu/test_cuda_compile.py is where that is checked.
    """
    if not cfg.parallel.compile or tp == 1:
        return
    if device_type(cfg.trainer.device) == "cpu":
        raise ConfigError(
            f"parallel.compile=true with parallel.tp={tp} cannot train on CPU: torch {torch.__version__}'s "
            f"compiled blocks return plain-tensor gradients to DTensor's backward under tensor parallelism; "
            f"use parallel.compile=false, or parallel.tp=1 (FSDP and compile work on CPU), or a CUDA device")


def apply_compile(model: nn.Module, loss_chunk: bool = True) -> None:
    """Compiles every block of ``model.decoder.layers`` and (``loss_chunk``) the model's loss chunk, in place.

    Under tensor parallelism the loss chunk stays eager: its inputs are vocab-sharded DTensors, and a
    compiled chunk hands plain-tensor gradients back to DTensor's redistribute backward (torch 2.13, CPU/gloo:
    "'Tensor' object has no attribute '_local_tensor'"; CPU TP + compile is refused, see check_compile).
    """
    for block in model.decoder.layers.values():
        block.compile(fullgraph=True)
    # Only the last pipeline stage computes the loss; GPTModel keeps its per-chunk output layer +
    # cross-entropy as a plain attribute so it can be swapped for a compiled one here.
    if loss_chunk and getattr(model, "loss_chunk_fn", None) is not None and model.decoder.final_layernorm is not None:
        model.loss_chunk_fn = compile_loss_chunk(model.loss_chunk_fn)
        model.selection_multiple = None  # label selections padded to whole chunks: one static chunk shape


def compile_loss_chunk(fn):
    """The chunk's logits [n, vocab] are the largest activation of a step; compiled, the matmul, the -inf
    padding columns and the fp32 log-softmax fuse so the upcast logits are not written out separately.

    Chunks come in two lengths only (chunk_size, and the shorter last chunk when tokens % chunk_size != 0),
    so each gets its own static graph: dynamic=False. With dynamo's automatic dynamic shapes instead, the
    second length makes n symbolic, and inductor then fails on the vocab-sharded DTensor logits of tensor
    parallelism (torch 2.13, CPU: "For 128 - 2*s14, expected [s14] to have been codegen-ed")."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place by nn.Module.compile()."""
    return getattr(module, "_compiled_call_impl", None) is not None
