"""QLoRA (model.lora.base_quant=nf4): the frozen base's decoder linear weights stored as torchao NF4 tensors,
quantized whole and sharded by FSDP2 as torchtune does; its refusals. The adapters themselves are trainer/lora.py."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError
from trainer.model.shapes import DECODER_LINEARS, linear_shapes

NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's to_nf4 defaults: values per scale, scales per scale-of-scales


def check_nf4(cfg, dims) -> None:
    """model.lora.base_quant=nf4's refusals, before anything is allocated."""
    import importlib.util

    lora, m = cfg.model.lora, cfg.model
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.lora.base_quant=nf4 needs torchao, which is not installed: pip install "
                          "'meshtron[qlora]' (torchao>=0.18,<0.19)")
    if lora.base_dtype != "bf16":
        raise ConfigError(f"model.lora.base_quant=nf4 needs model.lora.base_dtype=bf16 (got {lora.base_dtype}): the "
                          f"NF4 weights dequantize to bf16 and the rest of the frozen base is kept in bf16")
    if m.moe.enabled:
        raise ConfigError(f"model.lora.base_quant=nf4 with an MoE model (model.moe.num_moe_experts="
                          f"{m.moe.num_moe_experts}): the stacked [E, out, in] expert weights run through "
                          f"torch._grouped_mm or per-expert slices, which torchao's NF4Tensor does not provide; "
                          f"use model.lora.base_dtype=bf16 without base_quant")
    if dims.tp > 1:
        raise ConfigError(f"model.lora.base_quant=nf4 with parallel.tp={dims.tp}: an NF4 weight is blocks of "
                          f"{NF4_BLOCK} values with their scales laid over the whole flattened weight, and torchao's "
                          f"NF4Tensor splits only by whole rows (no column shards for the row-parallel linear_proj "
                          f"and linear_fc2, no DTensor tensor-parallel ops); use QLoRA with FSDP/HSDP, context or "
                          f"pipeline parallelism, without tensor parallelism")
    if cfg.parallel.compile:
        raise ConfigError("model.lora.base_quant=nf4 with parallel.compile=true is not supported (not proven here)")
    whole = NF4_BLOCK * NF4_SCALER_BLOCK
    shards = dims.dp_shard * dims.cp if dims.fsdp_enabled else 1  # FSDP's shard group: dp_shard x cp ranks
    for name, (rows, cols) in linear_shapes(m).items():
        if (rows * cols) % whole:
            raise ConfigError(f"model.lora.base_quant=nf4: decoder.layers.*.{name} is {rows} x {cols} = "
                              f"{rows * cols} values, not a multiple of {NF4_BLOCK} x {NF4_SCALER_BLOCK} = "
                              f"{whole} (NF4's blocks and scale blocks); change the model's widths or use "
                              f"model.lora.base_dtype=bf16 without base_quant")
        # FSDP2 gives each rank rows / shards whole rows of the NF4 weight (NF4Tensor's aten.split): each shard
        # must hold whole blocks and whole scale blocks, or torchao cannot split the packed data and scales.
        if shards > 1 and (rows % shards or (rows // shards * cols) % whole):
            raise ConfigError(f"model.lora.base_quant=nf4 with FSDP over {shards} ranks (dp_shard x cp): "
                              f"decoder.layers.*.{name} is {rows} x {cols}, and FSDP shards its rows; each "
                              f"rank's {rows} / {shards} rows must be whole and hold a multiple of {whole} values "
                              f"(NF4's blocks of {NF4_BLOCK} x scale blocks of {NF4_SCALER_BLOCK}); change the "
                              f"widths or the FSDP degree, or use model.lora.base_dtype=bf16 without base_quant")


@torch.no_grad()
def quantize_base(model: nn.Module) -> int:
    """model.lora.base_quant=nf4: the decoder's linear weights (loaded or initialised, bf16) become torchao
    NF4Tensors, frozen; returns how many. F.linear on an NF4 weight dequantizes it to the input's dtype.

    Under FSDP2 (torchtune's QLoRA recipe, training/_distributed.py): each weight is gathered whole (bf16, one
    at a time), quantized whole, and the rank keeps its dim-0 chunk (NF4Tensor's aten.split: whole blocks of
    packed values and scales, the whole tensor's scaler mean) as the local tensor of the same DTensor. So the
    NF4 values on any layout are those of one process, and FSDP's all-gather moves the 4-bit data and scales
    (NF4Tensor.fsdp_pre_all_gather/fsdp_post_all_gather), not bf16. The new parameter goes in through
    load_state_dict(assign=True), whose post hook is FSDP2's public way to re-read a replaced sharded parameter."""
    from trainer.torch_compat import quiet_torchao

    with quiet_torchao():
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    count = 0
    for layer in model.decoder.layers.values():
        for path in DECODER_LINEARS:
            module = layer.get_submodule(path)
            w = module.weight
            if isinstance(w, DTensor):
                nf4 = to_nf4(w.full_tensor().to(torch.bfloat16), NF4_BLOCK, NF4_SCALER_BLOCK)
                local = _local_nf4(nf4, w)
                # Free this rank's bf16 shard first: FSDP's reset_sharded_param compares the old and new shards'
                # storages unless the old one is freed, and an NF4Tensor (a wrapper subclass) has none.
                w.to_local().untyped_storage().resize_(0)
                module.load_state_dict({"weight": local}, strict=False, assign=True)
                module.weight.requires_grad_(False)
            else:
                module.weight = nn.Parameter(to_nf4(w.detach().to(torch.bfloat16), NF4_BLOCK, NF4_SCALER_BLOCK),
                                             requires_grad=False)
            count += 1
    return count


def _local_nf4(nf4: torch.Tensor, like: DTensor) -> DTensor:
    """The whole NF4 weight -> a DTensor placed as ``like`` (FSDP's Shard(0) over its shard mesh dim,
    Replicate over HSDP's replicas), holding this rank's chunk of rows."""
    from torch.distributed.tensor import Shard

    local = nf4
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"an NF4 weight sharded on dim {placement.dim}; FSDP shards dim 0")
            n, rank = like.device_mesh.size(dim), like.device_mesh.get_local_rank(dim)
            local = torch.chunk(local, n, dim=0)[rank]
    if tuple(local.shape) != tuple(like.to_local().shape):
        raise ValueError(f"NF4 chunk {list(local.shape)} vs FSDP's local shard {list(like.to_local().shape)}")
    return DTensor(local, like._spec, requires_grad=False)
