"""LoRA: low-rank adapters on the decoder's linear layers, applied from outside the model like the parallelisms
(parallel/parallelize.py: first on each stage, before tensor parallelism, compile and FSDP). The base parameters
keep their names and are frozen; each adapter is two parameters on the linear module itself, so its FQN is the
base's plus ``lora_A``/``lora_B``, and a forward hook adds ``scale * B(A(dropout(x)))`` to the module's output.

Fused bases and PEFT. PEFT adapts HF's separate q_proj, k_proj, v_proj, each with its own A and B. Our
linear_qkv fuses them, rows interleaved per query group ([q_g; k_g; v_g], checkpoint_convert/mapping.py
interleave_qkv), and a single A for the fused module would be a different (shared-rank) adapter. So linear_qkv
carries three adapters, ``lora_A_q``/``lora_B_q``, ``_k``, ``_v`` = PEFT's q_proj/k_proj/v_proj adapters, and
their outputs are interleaved per group into the fused output: both directions are exact, tensor for tensor.
Our gate and up projections are two modules already (linear_fc1_gate/_up = PEFT's gate_proj/up_proj).

Tensor parallelism (parallel/tensor_parallel.py, LoraColwiseParallel/LoraRowwiseParallel). A column-parallel
base (qkv, gate, up: output rows sharded) gets A replicated and B sharded like the base's rows; a row-parallel
base (proj, fc2: input columns sharded) gets A sharded like the base's columns and B replicated. The adapters are
DTensors and the hook runs on the DTensor input and output the TP styles give the base (it is registered before
them, so it runs first), so DTensor's own rules give the replicated factor's gradient as a Partial sum over tp
(sequence-parallel ranks included): reduced, not dropped, like the norm weights' gradients.

Initialisation: each adapter tensor drawn whole from the (seed, name) generator (trainer/model/init.py), then
its local part kept: the same values at any layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError
from trainer.lora_config import LoraConfig
from trainer.model.init import assign_full, clean_fqn, name_seed
from trainer.model.shapes import DECODER_LINEARS, linear_shapes

from trainer.model.gpt import ADAPTER  # noqa: E402 - ".lora_": in every adapter's name, never a base parameter's
QKV_PARTS = ("q", "k", "v")
# Our module (under decoder.layers.N.) -> PEFT's HF module, per adapter part.
PEFT_MODULES = {
    ("self_attention.linear_qkv", "q"): "self_attn.q_proj",
    ("self_attention.linear_qkv", "k"): "self_attn.k_proj",
    ("self_attention.linear_qkv", "v"): "self_attn.v_proj",
    ("self_attention.linear_proj", ""): "self_attn.o_proj",
    ("mlp.linear_fc1_gate", ""): "mlp.gate_proj",
    ("mlp.linear_fc1_up", ""): "mlp.up_proj",
    ("mlp.linear_fc2", ""): "mlp.down_proj",
}
# Targets (megatron-core names) -> our modules in a decoder layer; column-parallel ones first.
TARGET_MODULES = {
    "linear_qkv": ("self_attention.linear_qkv",),
    "linear_proj": ("self_attention.linear_proj",),
    "linear_fc1": ("mlp.linear_fc1_gate", "mlp.linear_fc1_up"),
    "linear_fc2": ("mlp.linear_fc2",),
}
COLUMN_PARALLEL = ("self_attention.linear_qkv", "mlp.linear_fc1_gate", "mlp.linear_fc1_up")


def is_adapter(name: str) -> bool:
    return ADAPTER in name


@dataclass(frozen=True)
class _Spec:
    scale: float
    dropout: float
    parts: tuple[str, ...]  # ("",) or QKV_PARTS
    head_dim: int = 0


def adapter_names(part: str) -> tuple[str, str]:
    return (f"lora_A_{part}", f"lora_B_{part}") if part else ("lora_A", "lora_B")


def add_adapters(model: nn.Module, lora: LoraConfig) -> int:
    """Adapters on every targeted linear module the model (or pipeline stage) holds, on the modules' device (meta
    when built there); returns how many modules got one."""
    cfg = model.config
    count = 0
    for layer in model.decoder.layers.values():
        for target in lora.targets:
            for path in TARGET_MODULES[target]:
                module = layer.get_submodule(path)
                if not isinstance(module, nn.Linear):
                    raise ConfigError(f"model.lora.target_modules has {target!r} but {path} is a "
                                      f"{type(module).__name__} here (an MoE layer?); adapters on experts are not "
                                      f"built yet")
                _attach(module, lora, cfg, fused=path == "self_attention.linear_qkv")
                count += 1
    return count


def _attach(module: nn.Linear, lora: LoraConfig, cfg, fused: bool) -> None:
    r, device = lora.rank, module.weight.device
    if fused:
        rows = {"q": cfg.num_attention_heads * cfg.head_dim, "k": cfg.num_query_groups * cfg.head_dim,
                "v": cfg.num_query_groups * cfg.head_dim}
        parts = QKV_PARTS
    else:
        rows, parts = {"": module.out_features}, ("",)
    for part in parts:
        a, b = adapter_names(part)
        module.register_parameter(a, nn.Parameter(torch.empty(r, module.in_features, device=device)))
        module.register_parameter(b, nn.Parameter(torch.empty(rows[part], r, device=device)))
    module._lora = _Spec(lora.scale, lora.dropout, parts, cfg.head_dim if fused else 0)
    module.register_forward_hook(_add_adapter_output)


def _add_adapter_output(module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    spec: _Spec = module._lora
    x = args[0]
    if spec.dropout and module.training:
        x = F.dropout(x, spec.dropout)
    outs = []
    for part in spec.parts:
        a, b = adapter_names(part)
        outs.append(F.linear(F.linear(x, getattr(module, a)), getattr(module, b)))
    delta = outs[0] if len(outs) == 1 else _interleave_groups(*outs, spec.head_dim)
    return out + delta * spec.scale


def _interleave_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q, k, v outputs [..., rows] -> the fused linear_qkv output, per query group [q_g; k_g; v_g]. Under tensor
    parallelism each rank holds whole groups of each (all three sharded alike by rows), so the interleave is of
    the local parts."""
    if isinstance(q, DTensor):
        mesh, placements = q.device_mesh, q.placements
        fused = _interleave_groups(q.to_local(), k.to_local(), v.to_local(), head_dim)
        return DTensor.from_local(fused, mesh, placements, run_check=False)
    groups = k.shape[-1] // head_dim
    lead = q.shape[:-1]
    fused = torch.cat([q.reshape(*lead, groups, -1), k.reshape(*lead, groups, head_dim),
                       v.reshape(*lead, groups, head_dim)], dim=-1)
    return fused.reshape(*lead, -1)


def store_base(model: nn.Module, base_dtype: str) -> None:
    """model.lora.base_dtype=bf16: the frozen base's parameters become bf16 (on the meta device, before FSDP and
    materialisation, so only bf16 storage is ever allocated; initial or HF weights are rounded into it)."""
    if base_dtype != "bf16":
        return
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not name.startswith("lora_"):
                module.register_parameter(name, nn.Parameter(p.to(torch.bfloat16), requires_grad=False))


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train. Called again after tensor parallelism: some styles re-register parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


@torch.no_grad()
def init_adapters(model: nn.Module, lora: LoraConfig, seed: int) -> None:
    """PEFT's initialisation, each tensor drawn whole from its (seed, name) generator: B zero; A Kaiming-uniform
    (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), torch's nn.Linear default, as PEFT draws it) or, with
    init=gaussian, N(0, 1/rank)."""
    for name, p in model.named_parameters():
        name = clean_fqn(name)
        if not is_adapter(name) or p.is_meta:
            continue
        full = torch.zeros(p.shape, device=p.device)
        if ".lora_A" in name:
            gen = torch.Generator(device=p.device).manual_seed(name_seed(seed, name))
            if lora.init == "gaussian":
                full.normal_(0.0, 1.0 / lora.rank, generator=gen)
            else:
                bound = 1.0 / math.sqrt(p.shape[1])
                full.uniform_(-bound, bound, generator=gen)
        assign_full(p, full)


def trainable_count(model_cfg, lora: LoraConfig) -> int:
    """Adapter parameters of the whole model (every layer, every stage)."""
    if not lora.enabled:
        return 0
    shapes = linear_shapes(model_cfg)
    per_layer = 0
    for target in lora.targets:
        for path in TARGET_MODULES[target]:
            rows, cols = shapes[path]
            # A per part ([rank, in] each: three for the fused qkv), B over all the module's rows.
            parts = len(QKV_PARTS) if path == "self_attention.linear_qkv" else 1
            per_layer += lora.rank * (parts * cols + rows)
    return per_layer * model_cfg.num_layers


_OURS = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.lora_([AB])(?:_([qkv]))?")


def peft_name(ours: str) -> str:
    """Our adapter FQN (decoder.layers.N.<module>.lora_A[_q]) -> PEFT's name in adapter_model.safetensors."""
    m = _OURS.fullmatch(ours)
    if m is None:
        raise ValueError(f"{ours} is not an adapter parameter")
    layer, module, factor, part = m[1], m[2], m[3], m[4] or ""
    return f"base_model.model.model.layers.{layer}.{PEFT_MODULES[module, part]}.lora_{factor}.weight"


def peft_target_modules(lora: LoraConfig) -> list[str]:
    return sorted({PEFT_MODULES[(path, part)].split(".")[-1] for target in lora.targets
                   for path in TARGET_MODULES[target]
                   for part in (QKV_PARTS if path == "self_attention.linear_qkv" else ("",))})


def check_lora(cfg, dims) -> None:
    """What LoRA does not compose with yet, refused before anything is allocated."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    if cfg.model.moe.enabled:
        raise ConfigError(f"model.lora.rank={lora.rank} with an MoE model (model.moe.num_moe_experts="
                          f"{cfg.model.moe.num_moe_experts}): adapters on experts are not built yet; LoRA trains "
                          f"dense models (Llama, Mistral, Qwen2, Qwen3)")
    if cfg.trainer.precision == "fp8":
        raise ConfigError("model.lora with trainer.precision=fp8 is not supported: the adapters would run beside "
                          "torchao's Float8Linear, which is not built; use trainer.precision=bf16")
    if lora.base_dtype == "bf16" and cfg.trainer.precision != "bf16":
        raise ConfigError(f"model.lora.base_dtype=bf16 needs trainer.precision=bf16 (got "
                          f"{cfg.trainer.precision}): the base's matmuls then run in bf16 on its bf16 weights")
    if lora.base_quant == "nf4":
        check_nf4(cfg, dims)
    if lora.dropout and dims.tp > 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout} with parallel.tp={dims.tp}: the dropout masks of "
                          f"the replicated adapter inputs would differ between tensor-parallel ranks; use "
                          f"model.lora.dropout=0 under tensor parallelism")


# ------------------------------------------------------------------------------------------------ QLoRA

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
    if dims.tp > 1:
        raise ConfigError(f"model.lora.base_quant=nf4 with parallel.tp={dims.tp}: an NF4 weight is blocks of "
                          f"{NF4_BLOCK} values with their scales laid over the whole flattened weight, and torchao's "
                          f"NF4Tensor has no tensor-parallel sharding; use QLoRA without tensor parallelism")
    if dims.fsdp_enabled:
        raise ConfigError("model.lora.base_quant=nf4 under FSDP (data or context parallelism) is not built yet: the "
                          "NF4 weights would have to be quantized whole and sharded at load, as torchtune does; "
                          "use one process per model replica (pipeline parallelism works) or model.lora.base_dtype="
                          "bf16 without base_quant")
    if cfg.parallel.compile:
        raise ConfigError("model.lora.base_quant=nf4 with parallel.compile=true is not supported (not proven here)")
    for name, (rows, cols) in linear_shapes(m).items():
        if (rows * cols) % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise ConfigError(f"model.lora.base_quant=nf4: decoder.layers.*.{name} is {rows} x {cols} = "
                              f"{rows * cols} values, not a multiple of {NF4_BLOCK} x {NF4_SCALER_BLOCK} = "
                              f"{NF4_BLOCK * NF4_SCALER_BLOCK} (NF4's blocks and scale blocks); change the "
                              f"model's widths or use model.lora.base_dtype=bf16 without base_quant")


@torch.no_grad()
def quantize_base(model: nn.Module) -> int:
    """model.lora.base_quant=nf4: the decoder's linear weights (loaded or initialised, bf16) become torchao
    NF4Tensors, frozen; returns how many. F.linear on an NF4 weight dequantizes it to the input's dtype."""
    from trainer.torch_compat import quiet_torchao

    with quiet_torchao():
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    count = 0
    for layer in model.decoder.layers.values():
        for path in DECODER_LINEARS:
            module = layer.get_submodule(path)
            module.weight = nn.Parameter(to_nf4(module.weight.detach().to(torch.bfloat16), NF4_BLOCK,
                                                NF4_SCALER_BLOCK), requires_grad=False)
            count += 1
    return count


# ------------------------------------------------------------------------------------------------- PEFT

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_peft_config(path, lora: LoraConfig) -> dict:
    """A PEFT adapter's adapter_config.json, checked against model.lora (ConfigError naming both sides)."""
    import json
    from pathlib import Path

    from trainer.errors import DamagedFileError

    d = Path(path)
    where = f"model.lora.init_from={path}"
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{where}: expected a PEFT adapter directory with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        raw = json.loads((d / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise DamagedFileError(d / ADAPTER_CONFIG, f"not valid JSON ({e})", "save the adapter again") from None
    if raw.get("peft_type") != "LORA" or raw.get("use_dora"):
        raise ConfigError(f"{where}: a {raw.get('peft_type')} adapter{' with DoRA' if raw.get('use_dora') else ''}; "
                          f"only plain LoRA adapters load")
    theirs = {"rank": raw.get("r"), "alpha": raw.get("lora_alpha"), "use_rslora": bool(raw.get("use_rslora")),
              "target_modules": sorted(raw.get("target_modules") or [])}
    ours = {"rank": lora.rank, "alpha": lora.alpha, "use_rslora": lora.use_rslora,
            "target_modules": peft_target_modules(lora)}
    diff = [f"{k}: adapter {theirs[k]} vs model.lora {ours[k]}" for k in ours if theirs[k] != ours[k]]
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        diff.append("per-module rank_pattern/alpha_pattern (not supported)")
    if diff:
        raise ConfigError(f"{where} does not match model.lora: " + "; ".join(diff)
                          + " (set model.lora.* to the adapter's values)")
    return raw


@torch.no_grad()
def load_peft_adapter(model: nn.Module, path) -> None:
    """Fill this model's (or stage's) adapters from a PEFT adapter, each tensor whole from the file, then this
    rank's part."""
    from pathlib import Path

    from safetensors import safe_open

    with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as f:
        names = set(f.keys())
        for name, p in model.named_parameters():
            name = clean_fqn(name)
            if not is_adapter(name):
                continue
            theirs = peft_name(name)
            if theirs not in names:
                raise ConfigError(f"model.lora.init_from={path}: {theirs} is missing (for {name}); the adapter "
                                  f"was trained for another model or other target modules")
            t = f.get_tensor(theirs)
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(f"model.lora.init_from={path}: {theirs} is {list(t.shape)}, but {name} is "
                                  f"{list(p.shape)}")
            assign_full(p, t.to(device=p.device, dtype=torch.float32))


def peft_config(lora: LoraConfig, base: Optional[str]) -> dict:
    """adapter_config.json as PEFT writes it, with what PEFT needs to load the adapter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
            "target_modules": peft_target_modules(lora), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True if lora.init == "default" else "gaussian", "inference_mode": True,
            "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(tensors: dict, lora: LoraConfig, base: Optional[str], out) -> None:
    """Our adapters (full tensors by our names) as a PEFT adapter directory, written under a hidden name and
    renamed when complete: adapter_config.json and adapter_model.safetensors in PEFT's names."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from checkpoint_convert.safetensors_files import staged_dir

    with staged_dir(Path(out), overwrite=True) as tmp:
        save_file({peft_name(n): t.detach().contiguous().cpu() for n, t in tensors.items()},
                  str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base), indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ merging


def merge_weight(name: str, weight: torch.Tensor, adapters: dict, lora: LoraConfig, cfg) -> torch.Tensor:
    """A base weight (our name, full tensor) with its adapters merged in: W + scale * B A, in fp32, returned in
    W's dtype; linear_qkv's three adapters interleaved per query group like its rows. Unadapted: W itself."""
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or not any(k.startswith(module + ".lora_") for k in adapters):
        return weight
    if module.endswith("linear_qkv"):
        from checkpoint_convert.mapping import interleave_qkv

        parts = [adapters[f"{module}.lora_B_{p}"].float() @ adapters[f"{module}.lora_A_{p}"].float()
                 for p in QKV_PARTS]
        delta = interleave_qkv(*parts, cfg.num_query_groups, cfg.head_dim)
    else:
        delta = adapters[f"{module}.lora_B"].float() @ adapters[f"{module}.lora_A"].float()
    return (weight.float() + lora.scale * delta).to(weight.dtype)
