"""The whole model, one full tensor at a time, on global rank 0: for a streamed export with no full copy
anywhere.

Every rank derives the same order from the config (the single-device model's state_dict: names, shapes,
dtypes), so no names travel. Per tensor, the pipeline rank holding it gathers it over its own mesh
(DTensor.full_tensor: an all-gather among the FSDP/TP ranks of that stage), and when that is not global
rank 0's pipeline rank, the peer of rank 0 in the pipeline group sends it to rank 0 (point to point over
the pp group, whose timeout is trainer.dist_timeout_s). Ranks other than 0 drop each tensor at once, so
each rank holds its shard plus at most one full tensor.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.dims import ParallelDims
from trainer.config import Config
from trainer.model import GPTModel
from trainer.model.init import clean_fqn

Layout = dict[str, tuple[torch.Size, torch.dtype]]


def export_layout(cfg: Config, dims: ParallelDims) -> Layout:
    """Name -> (shape, dtype) of every tensor of the single-device model, in its state_dict order (no
    pipeline copy of tied embeddings; vocabulary rows padded as the parallel model has them)."""
    with torch.device("meta"):
        model = GPTModel(cfg.model, padded_vocab_size=dims.padded_vocab(cfg.model))
    # LoRA's frozen base may be stored in bf16 (model.lora.base_dtype, trainer/lora.py store_base).
    bf16 = cfg.model.lora.enabled and cfg.model.lora.base_dtype == "bf16"
    return {name: (t.shape, torch.bfloat16 if bf16 and t.is_floating_point() else t.dtype)
            for name, t in model.state_dict().items()}


def owner_pp_ranks(cfg: Config, dims: ParallelDims, names) -> dict[str, int]:
    """The pipeline rank that holds each tensor: by layer index, stage 0 for the embedding, the last stage
    for the final norm and output layer (parallel/pipeline.py's placement)."""
    if not dims.pp_enabled:
        return dict.fromkeys(names, 0)
    from parallel.pipeline import stage_ids_for_rank, stage_layer_ranges

    p = cfg.parallel
    ranges = stage_layer_ranges(cfg.model.num_layers, dims.pp, p.pp_virtual_stages)
    rank_of_stage = {s: r for r in range(dims.pp)
                     for s in stage_ids_for_rank(r, dims.pp, p.pp_virtual_stages, p.pp_schedule)}
    stage_of_layer = {layer: s for s, layers in enumerate(ranges) for layer in layers}
    owners = {}
    for name in names:
        if name.startswith("decoder.layers."):
            stage = stage_of_layer[int(name.split(".")[2])]
        elif name.startswith("embedding."):
            stage = 0
        else:  # decoder.final_layernorm, output_layer
            stage = len(ranges) - 1
        owners[name] = rank_of_stage[stage]
    return owners


def adapter_layout(cfg: Config, dims: ParallelDims) -> Layout:
    """Name -> (shape, dtype) of every LoRA adapter of the single-device model (trainer/lora.py), in model order."""
    from trainer.lora import add_adapters, is_adapter

    with torch.device("meta"):
        model = GPTModel(cfg.model, padded_vocab_size=dims.padded_vocab(cfg.model))
        add_adapters(model, cfg.model.lora)
    return {name: (t.shape, t.dtype) for name, t in model.named_parameters() if is_adapter(name)}


def iter_full_tensors(pm, cfg: Config, layout: Optional[Layout] = None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(name, full CPU tensor on global rank 0, None elsewhere) for every tensor of `layout` (default
    export_layout: the base model), in its order. Every rank must iterate to the end: each step is a collective
    among some of them."""
    dims = pm.dims
    layout = layout if layout is not None else export_layout(cfg, dims)
    local = {clean_fqn(n): t for m in pm.modules for n, t in m.state_dict().items()}
    if pm.mesh is None:
        for name in layout:
            yield name, local[name].detach().cpu()
        return
    rank = dist.get_rank()
    pp_rank = pm.mesh["pp"].get_local_rank() if dims.pp_enabled else 0
    pp_group = pm.mesh["pp"].get_group() if dims.pp_enabled else None
    # Only the members of rank 0's pipeline group (its peers at the other stages) send anything.
    in_rank0_pp_group = pp_group is not None and 0 in dist.get_process_group_ranks(pp_group)
    device = _device(local)
    for name, owner in owner_pp_ranks(cfg, dims, layout).items():
        shape, dtype = layout[name]
        full = _gather(local, name, shape, dtype) if owner == pp_rank else None
        if owner != 0 and in_rank0_pp_group:
            if rank == 0:
                full = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(full, group=pp_group, group_src=owner)
            elif pp_rank == owner:
                dist.send(full.contiguous(), group=pp_group, group_dst=0)
        if rank != 0:
            full = None  # dropped before the next tensor is gathered
        yield name, None if full is None else full.cpu()
        full = None


def _gather(local: dict, name: str, shape, dtype) -> torch.Tensor:
    if name not in local:
        raise RuntimeError(f"export: this rank's pipeline stages should hold {name}, but hold only "
                           f"{sorted(local)[:4]}...")
    t = local[name]
    full = t.full_tensor() if isinstance(t, DTensor) else t
    if hasattr(full, "get_original_weight"):  # QLoRA's NF4 base weight (trainer/lora.py): its bf16 values
        full = full.get_original_weight()
    if tuple(full.shape) != tuple(shape) or full.dtype != dtype:
        raise RuntimeError(f"export: {name} is {list(full.shape)} {full.dtype} here, but the config gives "
                           f"{list(shape)} {dtype}")
    return full.detach()


def _device(local: dict) -> torch.device:
    t = next(iter(local.values()))
    return (t.to_local() if isinstance(t, DTensor) else t).device
