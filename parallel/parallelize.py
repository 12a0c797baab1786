"""Builds the model as this rank holds it: split into pipeline stages, then per stage, in a fixed order,
fp8 (parallel/float8.py) -> TP(+SP) -> EP -> CP -> activation checkpointing -> compile -> FSDP/HSDP, then materialised and initialised (from trainer.seed, or by the caller's weight loader: the trainer
passes its HF loader, so this package never reads checkpoint formats).

The model is first built on the meta device (no memory), so every parallelism only ever allocates this
rank's part. Initial weights do not depend on the layout (trainer/model/init.py), which is what lets every
layout be compared with a single process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from parallel.dims import ParallelDims
from trainer.config import Config
from trainer.model import GPTModel
from trainer.model.init import clean_fqn

if TYPE_CHECKING:  # parallel.pipeline imports torch's pipelining: only when pp > 1
    from parallel.pipeline import PipelineRunner


@dataclass
class ParallelModel:
    """This rank's share of the model and how to drive it."""

    stages: list[tuple[int, nn.Module]]  # (stage id, module): the whole model, or this rank's pipeline stages
    dims: ParallelDims
    mesh: Optional[DeviceMesh] = None  # None: one process
    runner: Optional["PipelineRunner"] = None  # when pp > 1
    duplicates: set = field(default_factory=set)  # tied-embedding copies, counted once in norms
    weights_s: float = 0.0  # of the build, seconds spent filling the weights (init or HF checkpoint)
    fp8_layers: int = 0  # linear layers this rank runs in fp8 (trainer.precision=fp8)

    @property
    def modules(self) -> list[nn.Module]:
        return [m for _, m in self.stages]

    def parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)


# Fills one stage's parameters from a checkpoint: (stage module, partial: the stage holds only part of the model).
WeightLoader = Callable[[GPTModel, bool], None]


def build_parallel_model(cfg: Config, dims: ParallelDims, mesh, device: torch.device,
                         load_weights: Optional[WeightLoader] = None) -> ParallelModel:
    p = cfg.parallel
    with torch.device("meta"):
        model = GPTModel(cfg.model, padded_vocab_size=dims.padded_vocab(cfg.model), seed=cfg.trainer.seed)
    if dims.pp_enabled:
        from parallel.pipeline import build_stage_modules

        stages = build_stage_modules(model, mesh["pp"].get_local_rank(), dims.pp, p.pp_virtual_stages,
                                     p.pp_schedule)
    else:
        stages = [(0, model)]

    moe = None
    if cfg.model.moe.enabled and mesh is not None:
        from parallel.expert_parallel import moe_meshes

        moe = moe_meshes(mesh, dims)
    weights_s, fp8_layers = 0.0, 0
    for _, module in stages:
        module.loss_chunk_size = cfg.trainer.loss_chunk_size  # a plain attribute: checkpoints never see it
        fp8_layers += _parallelize_one(module, cfg, dims, mesh, device, moe)
        module.to_empty(device=device)
        started = time.perf_counter()
        _initialise(module, cfg, load_weights)
        weights_s += time.perf_counter() - started

    pm = ParallelModel(stages, dims, mesh, weights_s=weights_s, fp8_layers=fp8_layers)
    if dims.pp_enabled:
        from parallel.pipeline import PipelineRunner, duplicate_params

        pm.duplicates = duplicate_params(stages)
        accum = dims.microbatches_per_step(cfg.trainer.global_batch_size, p.microbatch_size)
        pm.runner = PipelineRunner(stages, mesh["pp"], p.pp_schedule, accum, device)
    return pm


def _parallelize_one(module: nn.Module, cfg: Config, dims: ParallelDims, mesh, device: torch.device,
                     moe=None) -> int:
    """Applies every parallelism to one stage in the fixed order; returns how many linear layers run in fp8."""
    p = cfg.parallel
    fp8_layers = 0
    lora = cfg.model.lora
    if lora.enabled:
        from trainer.lora import add_adapters, freeze_base, store_base

        add_adapters(module, lora)  # first: the TP styles below place the adapters with their bases
        freeze_base(module)
        store_base(module, lora.base_dtype)
    if cfg.trainer.precision == "fp8":
        from parallel.float8 import convert_to_float8

        # First: torchao's float8 TP styles take only Float8Linear modules (parallel/float8.py).
        fp8_layers = convert_to_float8(module, cfg, device.type, fsdp=dims.fsdp_enabled)
    if dims.tp_enabled:
        from parallel.float8 import tp_styles
        from parallel.tensor_parallel import apply_tensor_parallel

        if lora.enabled:
            from parallel.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel
            from trainer.lora import freeze_base

            styles = (LoraColwiseParallel, LoraRowwiseParallel)
        else:
            styles = tp_styles(cfg, device.type)
        apply_tensor_parallel(module, mesh["tp"], sequence_parallel=p.sequence_parallel, loss_parallel=True,
                              styles=styles)
        if lora.enabled:
            freeze_base(module)  # torch's SequenceParallel re-registers the norms' weights as trainable
    if moe is not None and moe.ep is not None:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(module, moe.ep, moe.expert_weights)
    if dims.cp_enabled:
        from parallel.context_parallel import apply_context_parallel

        apply_context_parallel(module, mesh["cp"])
    if moe is not None and moe.row is not None:
        from parallel.expert_parallel import apply_row_split

        apply_row_split(module, moe.row)
    if p.activation_checkpoint != "none":
        from parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(module, p.activation_checkpoint)
    if p.compile:
        from parallel.compile import apply_compile

        # After checkpointing (the wrapper is compiled, recompute included), before FSDP (hooks stay around).
        apply_compile(module, loss_chunk=not dims.tp_enabled)
    # MoE layers need FSDP's gradient reduction also without data parallelism: under tp each rank's tokens
    # give a partial gradient of the router and experts, summed over the layer's mesh (data x tp ranks).
    if dims.fsdp_enabled or (moe is not None and moe.layer is not None):
        from parallel.fsdp import apply_fsdp

        dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        # Under PP each stage runs several micro-batches back to back: keep parameters gathered between them.
        apply_fsdp(module, dp_mesh, cfg.trainer.precision, reshard_after_forward=not dims.pp_enabled,
                   moe_layer_mesh=moe.layer if moe is not None else None,
                   expert_mesh=moe.experts if moe is not None else None)
    return fp8_layers


@torch.no_grad()
def _initialise(module: GPTModel, cfg: Config, load_weights: Optional[WeightLoader]) -> None:
    if load_weights is None:
        if cfg.model.hf_path:  # a caller's mistake, not the user's: the trainer passes its HF loader
            raise ValueError(f"model.hf_path={cfg.model.hf_path!r} is set but build_parallel_model got no "
                             "load_weights (trainer.loop.hf_weight_loader gives one)")
        module.init_weights(cfg.trainer.seed)
    else:
        module.rotary_pos_emb.reset_parameters()
        load_weights(module, len(module.decoder.layers) < cfg.model.num_layers or module.embedding is None
                     or module.decoder.final_layernorm is None)
    if cfg.model.lora.enabled:
        from trainer.lora import init_adapters, load_peft_adapter

        init_adapters(module, cfg.model.lora, cfg.trainer.seed)
        if cfg.model.lora.init_from:
            load_peft_adapter(module, cfg.model.lora.init_from)
        if cfg.model.lora.base_quant == "nf4":
            from trainer.qlora import quantize_base

            quantize_base(module)  # after the weights are in: NF4 is computed from their values


def full_state_dict(pm: ParallelModel) -> Optional[dict[str, torch.Tensor]]:
    """The whole model as full CPU tensors on global rank 0 (None elsewhere).

    Every rank takes part: DTensors are gathered over their mesh, then pipeline stages over pp. Every rank
    holds a full copy on the way, so the trainer's export streams instead (parallel/export.py); this stays as
    the reference the streamed export is tested against.
    """
    import torch.distributed as dist

    local: dict[str, torch.Tensor] = {}
    for m in pm.modules:
        for name, t in m.state_dict().items():
            t = t.full_tensor() if isinstance(t, DTensor) else t
            local[clean_fqn(name)] = t.detach().cpu()
    if pm.dims.pp_enabled and pm.modules[0].config.tie_word_embeddings:
        local.pop("output_layer.weight", None)  # the last stage's copy of the tied embedding
    if pm.mesh is None:
        return local
    if pm.dims.pp_enabled:
        parts = [None] * pm.dims.pp
        dist.all_gather_object(parts, local, group=pm.mesh["pp"].get_group())
        local = {k: v for part in parts for k, v in part.items()}
    return local if dist.get_rank() == 0 else None
