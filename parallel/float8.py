"""FP8 training (trainer.precision=fp8) with torchao's float8: the decoder's nn.Linear layers become torchao
Float8Linear, and an MoE model's routed experts run torchao's float8 grouped GEMMs, applied from outside the model
like every parallelism.

What runs in fp8: the matmuls of linear_qkv, linear_proj, linear_fc1_gate/up and linear_fc2 (forward, and both
backward GEMMs), with dynamic scales per tensor (recipe tensorwise) or per row (rowwise, the default, torchao's
more accurate recipe); in an MoE layer the shared experts' linears likewise (plain linears, as torchtitan's float8
converter takes them) and the routed experts' grouped GEMMs (below). Everything else runs as trainer.precision=bf16
runs it: bf16 autocast (or FSDP's bf16 parameters) over fp32 master weights and fp32 optimizer states. Not
converted: embeddings and norms (not linear layers), the output layer (its matmul runs inside the chunked loss on
the weight itself, trainer/model/gpt.py), an MoE router, and any layer trainer.fp8.skip names.

The router stays bf16, as in torchtitan (its float8 recipes filter `router.gate`): top-k routing is discontinuous
in the logits, so fp8 rounding there would move tokens between experts, for a GEMM of E (often < 16) outputs that
costs nothing next to the experts.

Routed experts (trainer/model/moe.py GroupedLinear, weights [E, out, in]): torchao's grouped-expert float8
(torchao.prototype.moe_training, recipe fp8_rowwise: A rowwise, each expert's weight per column, power-of-2
scales, then torch._scaled_grouped_mm; backward likewise). Its kernels are triton and torch._scaled_grouped_mm,
which runs on CUDA compute capability 9.x and 10.x only (a set, not a floor: sm 12.x is out) and has no emulation
in torchao 0.18, so anywhere else the experts are refused (check_fp8) unless trainer.fp8.skip keeps them in bf16
('*.mlp.experts.*'), which lets an MoE model run its other linears in fp8 on any device, emulated on CPU. Each
GroupedLinear becomes a Float8GroupedLinear (the same module and parameter, its grouped GEMM swapped), not a
tensor subclass on the weight (torchao's Float8TrainingWeightWrapperTensor): the parameter stays a plain tensor
through meta init, expert parallelism's DTensor, FSDP2 (bf16 all-gathers, as torchao's wrapper does too) and DCP.
Token groups are padded to 16 rows on the device, static shapes and no host read (torchtitan pads to 16 for fp8
grouped GEMMs too: the weight-gradient GEMM contracts over each group's rows, and fp8 operands need 16-byte
aligned groups); an empty group gets 16 zero rows so its weight gradient is a GEMM of zeros, not an unwritten
output. The loop over experts (model.moe.moe_grouped_gemm=false, or where torch._grouped_mm does not run) has no
fp8 path: refused up front, and a converted layer raises rather than run bf16 while reporting fp8.

Order (parallel/parallelize.py): first on each stage, before tensor parallelism, because torchao's float8 TP
styles (Float8ColwiseParallel / Float8RowwiseParallel: the sequence-parallel all-gather in fp8) only accept
Float8Linear modules; torchtitan converts before parallelizing for the same reason. Then TP, EP (which shards the
converted experts' weights like any), activation checkpointing, compile and FSDP as for bf16; with tensorwise and
FSDP, FSDP2 all-gathers the dense weights in fp8 (enable_fsdp_float8_all_gather). Float8Linear and
Float8GroupedLinear keep their modules' parameters, so FQNs, checkpoints and conversions are those of a bf16 run.

Emulation (trainer.fp8.emulate, default true on CPU, false on CUDA): torchao casts to fp8 and back and multiplies
in high precision, the same numerics without fp8 GEMMs: how the conversion and every layout are proven on CPU.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import importlib.util
from typing import Optional

import torch
from torch import nn

from trainer.config import Config, Fp8Config
from trainer.errors import ConfigError
from trainer.model.moe import GroupedExperts, GroupedLinear, grouped_mm_usable
from trainer.model.shapes import DECODER_LINEARS, linear_shapes
from trainer.torch_compat import quiet_torchao

# The torchao releases this code is written and tested against (pyproject's `fp8` extra): 0.18 imports and
# trains with every torch of our range (2.11 to 2.14).
TORCHAO_RANGE = ((0, 18), (0, 19))
TORCHAO_PIN = "torchao>=0.18,<0.19"
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: torch._scaled_mm's fp8 GEMMs
GEMM_MULTIPLE = 16  # fp8 GEMMs need both dimensions of the weight divisible by 16
# torch._scaled_grouped_mm (torchao's fp8 grouped GEMM) runs on these compute capability majors only (Hopper,
# Blackwell datacenter); its check is `major == 9 || major == 10`.
GROUPED_FP8_MAJORS = (9, 10)
EXPERT_LINEARS = ("linear_fc1_gate", "linear_fc1_up", "linear_fc2")  # of mlp.experts and mlp.shared_experts
SHARED_EXPERT_LINEARS = tuple(f"mlp.shared_experts.{n}" for n in EXPERT_LINEARS)
SKIP_EXPERTS = "*.mlp.experts.*"  # the trainer.fp8.skip pattern that keeps every routed expert in bf16


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
    for name, (rows, cols) in {**linear_shapes(cfg.model, tp), **shared_expert_shapes(cfg)}.items():
        if not rows % GEMM_MULTIPLE and not cols % GEMM_MULTIPLE:
            continue
        converted = [i for i in layers_with(cfg, name) if not skipped(f"decoder.layers.{i}.{name}", fp8)]
        if converted:
            raise ConfigError(f"trainer.precision=fp8: decoder.layers.{converted[0]}.{name} is {rows} x {cols} on "
                              f"each tensor-parallel rank (tp={tp}); fp8 GEMMs need both dimensions divisible by "
                              f"{GEMM_MULTIPLE}: change the model's widths or parallel.tp, or keep it in bf16 with "
                              f"trainer.fp8.skip=['*.{name}']")
    experts = routed_experts(cfg)
    if experts:
        check_fp8_experts(cfg, experts, version, emulate, device)


def layers_with(cfg: Config, name: str) -> list[int]:
    """The layers that hold this linear: attention in every layer, the dense MLP in dense layers only, the shared
    experts in MoE layers only."""
    if name.startswith("self_attention."):
        return list(range(cfg.model.num_layers))
    in_moe = name.startswith("mlp.shared_experts.")
    return [i for i in range(cfg.model.num_layers) if cfg.model.moe.is_moe_layer(i) == in_moe]


def shared_expert_shapes(cfg: Config) -> dict[str, tuple[int, int]]:
    """(out, in) of an MoE layer's shared-expert linears (Float8Linear like the dense ones; an MoE layer is not
    split over tp); none without."""
    width, hidden = cfg.model.moe.moe_shared_expert_intermediate_size, cfg.model.hidden_size
    if not (cfg.model.moe.enabled and width):
        return {}
    return dict(zip(SHARED_EXPERT_LINEARS, ((width, hidden), (width, hidden), (hidden, width))))


def routed_experts(cfg: Config) -> dict[str, tuple[int, int, int]]:
    """{FQN: (experts, out, in)} of the routed experts' stacked weights that fp8 converts (those
    trainer.fp8.skip does not name), in layer order."""
    moe = cfg.model.moe
    if not moe.enabled:
        return {}
    hidden, width = cfg.model.hidden_size, moe.expert_ffn(cfg.model.ffn_hidden_size)
    shapes = dict(zip(EXPERT_LINEARS, ((width, hidden), (width, hidden), (hidden, width))))
    out = {}
    for i in moe.moe_layers(cfg.model.num_layers):
        for name in EXPERT_LINEARS:
            fqn = f"decoder.layers.{i}.mlp.experts.{name}"
            if not skipped(fqn, cfg.trainer.fp8):
                out[fqn] = (moe.num_moe_experts, *shapes[name])
    return out


def check_fp8_experts(cfg: Config, experts: dict[str, tuple[int, int, int]], version: str, emulate: bool,
                      device: torch.device) -> None:
    """What torchao's grouped-expert float8 cannot take, for routed experts fp8 converts (check_fp8)."""
    first = next(iter(experts))
    what = f"trainer.precision=fp8 with MoE routed experts ({first}, ...)"
    keep = (f"keep the routed experts in bf16 with trainer.fp8.skip=['{SKIP_EXPERTS}'] (every other linear layer "
            f"stays fp8) or use trainer.precision=bf16")
    with quiet_torchao():  # finding it imports torchao.prototype
        prototype = importlib.util.find_spec("torchao.prototype.moe_training")
    if prototype is None:
        raise ConfigError(f"{what}: torchao {version} has no grouped-expert float8 (torchao.prototype.moe_training); "
                          f"install {TORCHAO_PIN}, or {keep}")
    recipe = cfg.trainer.fp8.recipe
    if recipe != "rowwise":
        raise ConfigError(f"{what}: torchao {version}'s grouped-expert float8 has the rowwise recipe only "
                          f"(Float8TrainingRecipe.FP8_ROWWISE), not trainer.fp8.recipe={recipe}: use "
                          f"trainer.fp8.recipe=rowwise, or {keep}")
    if not cfg.model.moe.moe_grouped_gemm:
        raise ConfigError(f"{what}: the experts' fp8 GEMM is torchao's grouped one, and the loop over experts "
                          f"(model.moe.moe_grouped_gemm=false) has no fp8 path: set model.moe.moe_grouped_gemm=true, "
                          f"or {keep}")
    for fqn, (e, rows, cols) in experts.items():
        if rows % GEMM_MULTIPLE or cols % GEMM_MULTIPLE:
            raise ConfigError(f"trainer.precision=fp8: {fqn} is {e} experts x {rows} x {cols}; fp8 grouped GEMMs "
                              f"need both dimensions of each expert divisible by {GEMM_MULTIPLE}: change "
                              f"model.hidden_size or model.moe.moe_ffn_hidden_size, or {keep}")
    if emulate:
        where = "on CPU" if device.type != "cuda" else "with trainer.fp8.emulate=true"
        raise ConfigError(f"{what} {where}: torchao {version}'s grouped-expert float8 has no emulation (triton "
                          f"kernels and torch._scaled_grouped_mm, CUDA compute capability 9.x or 10.x only); "
                          f"run on such a GPU with trainer.fp8.emulate unset, or {keep}")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability[0] not in GROUPED_FP8_MAJORS:
        raise ConfigError(f"{what}: torchao's fp8 grouped GEMM (torch._scaled_grouped_mm) runs on compute "
                          f"capability 9.x or 10.x only (Hopper, Blackwell B100/B200); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: {keep}")
    hidden, width = cfg.model.hidden_size, cfg.model.moe.expert_ffn(cfg.model.ffn_hidden_size)
    # A few bytes on the GPU, once: the probe the model's forward makes (trainer/model/gpt.py), asked now so that
    # a device without bf16 grouped GEMMs is refused here, not met by Float8GroupedLinear.looped mid-step.
    if not grouped_mm_usable(device, torch.bfloat16, hidden, width):
        raise ConfigError(f"{what}: torch._grouped_mm does not run on {torch.cuda.get_device_name(device)} "
                          f"(torch {torch.__version__}), so the experts would take the loop over experts, which has "
                          f"no fp8 path: {keep}")


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
    """Swap the decoder's linear layers (and an MoE layer's shared-expert linears; not the output layer, not
    those trainer.fp8.skip names) for torchao's Float8Linear, and its routed experts' GroupedLinear for
    Float8GroupedLinear, in place; returns how many were converted."""
    with quiet_torchao():
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

    fp8 = cfg.trainer.fp8

    def wanted(mod: nn.Module, fqn: str) -> bool:
        return (fqn.startswith("decoder.layers.") and fqn.endswith(DECODER_LINEARS + SHARED_EXPERT_LINEARS)
                and not skipped(fqn, fp8))

    convert_to_float8_training(module, module_filter_fn=wanted,
                               config=float8_linear_config(cfg, device_type, fsdp))
    return sum(isinstance(m, Float8Linear) for m in module.modules()) + convert_experts(module, fp8)


def convert_experts(module: nn.Module, fp8: Fp8Config) -> int:
    """Every routed expert GroupedLinear trainer.fp8.skip does not name becomes a Float8GroupedLinear; returns
    how many. Swapping the class keeps the module, its parameter and whatever else it holds (FSDP2's
    fully_shard swaps classes the same way), so FQNs and every later parallelism see the module they knew."""
    converted = 0
    for name, experts in module.named_modules():
        if not isinstance(experts, GroupedExperts):
            continue
        for attr in EXPERT_LINEARS:
            linear = getattr(experts, attr)
            if type(linear) is GroupedLinear and not skipped(f"{name}.{attr}", fp8):
                linear.__class__ = Float8GroupedLinear
                converted += 1
    return converted


class Float8GroupedLinear(GroupedLinear):
    """A routed expert GroupedLinear whose grouped GEMM is torchao's float8 one (rowwise dynamic scales,
    torch._scaled_grouped_mm, out in bf16) over token groups padded to GEMM_MULTIPLE rows (pad_groups)."""

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        rows, ends, padded = pad_groups(offsets, x.shape[0], GEMM_MULTIPLE)
        a = x.new_zeros(padded, x.shape[1]).index_copy(0, rows, x)
        # Inputs are already in the compute dtype; torchao's autograd function runs outside autocast.
        with torch.autocast(x.device.type, enabled=False):
            out = scaled_grouped_mm(a, self.local_weight().to(dtype).transpose(-2, -1), ends)
        return out.index_select(0, rows)

    def looped(self, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
        raise RuntimeError("a routed expert converted to fp8 was asked for the loop over experts, which has no fp8 "
                           "path (torch._grouped_mm unusable here, or model.moe.moe_grouped_gemm=false): check_fp8 "
                           "refuses both before training; keep the experts in bf16 with trainer.fp8.skip=['"
                           f"{SKIP_EXPERTS}']")


def pad_groups(offsets: torch.Tensor, rows: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows sorted by group, ``offsets`` the groups' int32 ends -> (where each row goes in the padded rows
    [rows], the padded groups' int32 ends, how many padded rows to allocate). Every group is padded to a multiple
    of ``multiple`` rows and to at least ``multiple``; the count allocated is the bound rows + groups x multiple,
    so shapes are static and nothing is read on the host."""
    ends = offsets.long()
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    padded_sizes = ((sizes + multiple - 1) // multiple).clamp(min=1) * multiple
    padded_ends = padded_sizes.cumsum(0)
    shift = (padded_ends - padded_sizes) - (ends - sizes)  # padded start - start, per group
    index = torch.arange(rows, device=offsets.device)
    group = torch.searchsorted(ends, index, right=True)  # the group of each row: ends before or at it
    return index + shift[group], padded_ends.to(torch.int32), rows + offsets.numel() * multiple


def scaled_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torchao's differentiable float8 grouped GEMM: a [M, K] row-major, b_t [E, K, N] column-major, group
    ends int32 [E] (multiples of 16) -> [M, N] in bf16. CUDA compute capability 9.x/10.x only."""
    with quiet_torchao():
        from torchao.prototype.moe_training.utils import _quantize_then_scaled_grouped_mm
    return _quantize_then_scaled_grouped_mm(a, b_t, config=_grouped_config(), offs=ends)


@functools.cache
def _grouped_config():
    with quiet_torchao():
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig, Float8TrainingRecipe
    return Float8TrainingOpConfig.from_recipe(Float8TrainingRecipe.FP8_ROWWISE)


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
