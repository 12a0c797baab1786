"""FP8 training (trainer.precision=fp8) with torchao's float8: the decoder's nn.Linear layers become torchao
Float8Linear, applied from outside the model like every parallelism.

What runs in fp8: the matmuls of linear_qkv, linear_proj, linear_fc1_gate/up and linear_fc2 (forward, and both
backward GEMMs), with dynamic scales per tensor (recipe tensorwise) or per row (rowwise, the default, torchao's
more accurate recipe). Everything else runs as trainer.precision=bf16 runs it: bf16 autocast (or FSDP's bf16
parameters) over fp32 master weights and fp32 optimizer states. Not converted: embeddings and norms (not linear
layers), the output layer (its matmul runs inside the chunked loss on the weight itself, trainer/model/gpt.py),
an MoE router and experts (refused below: see check_fp8), and any layer trainer.fp8.skip names.

Order (parallel/parallelize.py): first on each stage, before tensor parallelism, because torchao's float8 TP
styles (Float8ColwiseParallel / Float8RowwiseParallel: the sequence-parallel all-gather in fp8) only accept
Float8Linear modules; torchtitan converts before parallelizing for the same reason. Then TP, activation
checkpointing, compile and FSDP as for bf16; with tensorwise and FSDP, FSDP2 all-gathers the weights in fp8
(enable_fsdp_float8_all_gather). Float8Linear keeps nn.Linear's parameters, so FQNs, checkpoints and conversions
are those of a bf16 run.

Emulation (trainer.fp8.emulate, default true on CPU, false on CUDA): torchao casts to fp8 and back and multiplies
in high precision, the same numerics without fp8 GEMMs: how the conversion and every layout are proven on CPU.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
from typing import Optional

import torch
from torch import nn

from trainer.config import Config, Fp8Config
from trainer.errors import ConfigError
from trainer.model.shapes import DECODER_LINEARS, linear_shapes
from trainer.torch_compat import quiet_torchao

# The torchao releases this code is written and tested against (pyproject's `fp8` extra): 0.18 imports and
# trains with every torch of our range (2.11 to 2.14).
TORCHAO_RANGE = ((0, 18), (0, 19))
TORCHAO_PIN = "torchao>=0.18,<0.19"
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: torch._scaled_mm's fp8 GEMMs
GEMM_MULTIPLE = 16  # fp8 GEMMs need both dimensions of the weight divisible by 16


def uses_fp8(cfg: Config) -> bool:
    return cfg.trainer.precision == "fp8"


def emulated(fp8: Fp8Config, device_type: str) -> bool:
    """trainer.fp8.emulate as set, else true except on CUDA."""
    return fp8.emulate if fp8.emulate is not None else device_type != "cuda"


def torchao_version() -> Optional[str]:
    if importlib.util.find_spec("torchao") is None:
        return None
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def check_fp8(cfg: Config, tp: int, device: torch.device) -> None:
    """Every refusal of trainer.precision=fp8, before anything is allocated (ConfigError: exit 2, one line)."""
    if not uses_fp8(cfg):
        return
    version = torchao_version()
    if version is None:
        raise ConfigError(f"trainer.precision=fp8 needs torchao, which is not installed: pip install "
                          f"'meshtron[fp8]' ({TORCHAO_PIN}), or use trainer.precision=bf16")
    low, high = TORCHAO_RANGE
    if not low <= _release(version)[:2] < high:
        raise ConfigError(f"trainer.precision=fp8: torchao {version} with torch {torch.__version__} is not a "
                          f"combination meshtron supports; install {TORCHAO_PIN} (pip install 'meshtron[fp8]')")
    if cfg.model.moe.enabled:
        raise ConfigError(f"trainer.precision=fp8 with an MoE model (model.moe.num_moe_experts="
                          f"{cfg.model.moe.num_moe_experts}): torchao {version}'s grouped-expert float8 "
                          f"(torchao.prototype.moe_training) is a CUDA-only prototype that meshtron does not wire "
                          f"in; train MoE models with trainer.precision=bf16")
    fp8 = cfg.trainer.fp8
    emulate = emulated(fp8, device.type)
    if not emulate and device.type != "cuda":
        raise ConfigError(f"trainer.fp8.emulate=false on {device.type}: fp8 GEMMs need a CUDA GPU of compute "
                          f"capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+; leave trainer.fp8.emulate "
                          f"unset (emulated on CPU: fp8 numerics, no speed-up)")
    if not emulate:
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise ConfigError(f"trainer.precision=fp8 needs fp8 GEMMs (compute capability "
                              f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+, Ada or Hopper); "
                              f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use "
                              f"trainer.precision=bf16, or trainer.fp8.emulate=true for fp8 numerics without "
                              f"its speed")
    for name, (rows, cols) in linear_shapes(cfg.model, tp).items():
        if not rows % GEMM_MULTIPLE and not cols % GEMM_MULTIPLE:
            continue
        converted = [i for i in range(cfg.model.num_layers) if not skipped(f"decoder.layers.{i}.{name}", fp8)]
        if converted:
            raise ConfigError(f"trainer.precision=fp8: decoder.layers.{converted[0]}.{name} is {rows} x {cols} on "
                              f"each tensor-parallel rank (tp={tp}); fp8 GEMMs need both dimensions divisible by "
                              f"{GEMM_MULTIPLE}: change the model's widths or parallel.tp, or keep it in bf16 with "
                              f"trainer.fp8.skip=['*.{name}']")


def skipped(fqn: str, fp8: Fp8Config) -> bool:
    """Whether trainer.fp8.skip keeps this layer in bf16 (fnmatch patterns on FQNs, e.g. 'decoder.layers.0.*')."""
    return any(fnmatch.fnmatchcase(fqn, pattern) for pattern in fp8.skip)


def float8_linear_config(cfg: Config, device_type: str, fsdp: bool):
    """torchao's Float8LinearConfig for the recipe; FSDP2 all-gathers in fp8 where torchao offers it
    (tensorwise scaling only)."""
    import dataclasses

    with quiet_torchao():
        from torchao.float8 import Float8LinearConfig

    fp8 = cfg.trainer.fp8
    base = Float8LinearConfig.from_recipe_name(fp8.recipe)
    return dataclasses.replace(base, emulate=emulated(fp8, device_type),
                               enable_fsdp_float8_all_gather=fsdp and fp8.recipe == "tensorwise")


def convert_to_float8(module: nn.Module, cfg: Config, device_type: str, fsdp: bool) -> int:
    """Swap the decoder's linear layers (not the output layer, not those trainer.fp8.skip names) for torchao's
    Float8Linear in place; returns how many were converted."""
    with quiet_torchao():
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

    fp8 = cfg.trainer.fp8

    def wanted(mod: nn.Module, fqn: str) -> bool:
        return fqn.startswith("decoder.layers.") and fqn.endswith(DECODER_LINEARS) and not skipped(fqn, fp8)

    convert_to_float8_training(module, module_filter_fn=wanted,
                               config=float8_linear_config(cfg, device_type, fsdp))
    return sum(isinstance(m, Float8Linear) for m in module.modules())


def tp_styles(cfg: Config, device_type: str):
    """(column-parallel, row-parallel) styles for the decoder's linear layers: torchao's float8 styles
    (sequence-parallel all-gathers in fp8) for tensorwise fp8 on CUDA, torch's own otherwise. Rowwise
    Float8Linear takes torch's styles as they are (torchao's styles assume tensorwise scales). On CPU, gloo has no
    fp8 dtypes to all-gather ("Invalid scalar type"), so tensorwise gathers in bf16 and casts after: the same
    fp8 values, since a tensorwise scale is the amax of the whole (gathered) tensor either way."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if uses_fp8(cfg) and cfg.trainer.fp8.recipe == "tensorwise" and device_type == "cuda":
        with quiet_torchao():
            from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel
        return Float8ColwiseParallel, Float8RowwiseParallel
    return ColwiseParallel, RowwiseParallel


def precompute_fsdp_scales(modules: list[nn.Module], cfg: Config, fsdp: bool) -> None:
    """After each optimizer step with tensorwise fp8 all-gathers: one all-reduce computes every weight's scale
    for the next step's all-gathers (torchao's precompute_float8_dynamic_scale_for_fsdp) instead of one per
    weight."""
    if not (uses_fp8(cfg) and fsdp and cfg.trainer.fp8.recipe == "tensorwise"):
        return
    with quiet_torchao():
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    for m in modules:
        precompute_float8_dynamic_scale_for_fsdp(m)
