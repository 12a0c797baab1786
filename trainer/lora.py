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

Mixtures of experts (trainer/model/moe.py). ``experts`` adapts the routed experts' stacked weights, one adapter
per expert, stacked on dim 0 like the weights (A [E, r, in], B [E, out, r]); ``router`` the router's weight
(A [r, H], B [E, r]); linear_fc1/linear_fc2 in an MoE layer are its shared experts' (Qwen2-MoE), where PEFT's
gate_proj/up_proj/down_proj match them too. The expert adapters run inside the experts' own token grouping:
GroupedLinear calls ``adapter(module, x, groups)`` after its GEMM, which runs x A_e^T B_e^T over the same
offsets with torch._grouped_mm (the rank zero-padded to 16 bytes, exact) or over the same host ends in a loop.
transformers 5 holds the experts fused, ``mlp.experts.gate_up_proj`` [E, 2F, H] (rows [gate; up]) and
``down_proj`` [E, H, F], and the router as ``mlp.gate.weight`` (a TopKRouter, not an nn.Linear; Mixtral's
block_sparse_moe is renamed mlp on load), so PEFT adapts them with ``target_parameters`` (lora.ParamWrapper,
peft 0.21.2 peft/tuners/lora/layer.py): for a 3-D [E, out, in] parameter lora_A.weight is [r*E, in], rows
expert-major (reshape(E, r, in)), lora_B.weight [out, r*E], columns rank-major and expert-minor
(reshape(out, r, E)), delta_e = scale * B_e A_e; a 2-D one is a plain [r, in], [out, r] pair. Its fused
gate_up_proj has ONE A per expert for gate and up, so ours is one A too: ``experts.linear_fc1_gate.lora_A``,
which linear_fc1_up's adapter uses as well (it has only ``lora_B``); PEFT's B is [gate B; up B] on its rows.
ParamWrappers of one module nest in the order of the module's parameters (gate_up_proj, then down_proj), so
PEFT's names are (under base_model.model.model.layers.N.):

    ours (decoder.layers.N.)                                       PEFT
    mlp.experts.linear_fc1_gate.lora_A [E, r, H]                   mlp.experts.base_layer.lora_A.weight [E*r, H]
    mlp.experts.linear_fc1_{gate,up}.lora_B [E, F, r] each         mlp.experts.base_layer.lora_B.weight [2F, r*E]
    mlp.experts.linear_fc2.lora_A [E, r, F]                        mlp.experts.lora_A.weight [E*r, F]
    mlp.experts.linear_fc2.lora_B [E, H, r]                        mlp.experts.lora_B.weight [H, r*E]
    mlp.router.lora_A [r, H], lora_B [E, r]                        mlp.gate.lora_{A,B}.weight
    mlp.shared_experts.linear_fc1_gate.lora_A ...                  mlp.shared_expert.gate_proj.lora_A.weight ...

PEFT's ParamWrapper has no dropout (it adds B A to the weight), so neither do these adapters.

Tensor parallelism (parallel/tensor_parallel.py, LoraColwiseParallel/LoraRowwiseParallel). A column-parallel
base (qkv, gate, up: output rows sharded) gets A replicated and B sharded like the base's rows; a row-parallel
base (proj, fc2: input columns sharded) gets A sharded like the base's columns and B replicated. The adapters are
DTensors and the hook runs on the DTensor input and output the TP styles give the base (it is registered before
them, so it runs first), so DTensor's own rules give the replicated factor's gradient as a Partial sum over tp
(sequence-parallel ranks included): reduced, not dropped, like the norm weights' gradients. An MoE layer is not
split over tp (parallel/tensor_parallel.py): its adapters are placed like its weights. Under expert parallelism
every expert adapter is sharded on its expert dim with the expert's weights (parallel/expert_parallel.py).

Initialisation: each adapter tensor drawn whole from the (seed, name) generator (trainer/model/init.py), then
its local part kept: the same values at any layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError
from trainer.lora_config import LORA_TARGETS, MOE_TARGETS, LoraConfig
from trainer.model.init import assign_full, clean_fqn, name_seed
from trainer.model.moe import GroupedLinear, MoELayer, TopKRouter, local_experts
from trainer.model.shapes import linear_shapes

from trainer.model.gpt import ADAPTER  # noqa: E402 - ".lora_": in every adapter's name, never a base parameter's
QKV_PARTS = ("q", "k", "v")
# Our module (under decoder.layers.N.) -> PEFT's HF module, per adapter part (nn.Linear modules: target_modules).
PEFT_MODULES = {
    ("self_attention.linear_qkv", "q"): "self_attn.q_proj",
    ("self_attention.linear_qkv", "k"): "self_attn.k_proj",
    ("self_attention.linear_qkv", "v"): "self_attn.v_proj",
    ("self_attention.linear_proj", ""): "self_attn.o_proj",
    ("mlp.linear_fc1_gate", ""): "mlp.gate_proj",
    ("mlp.linear_fc1_up", ""): "mlp.up_proj",
    ("mlp.linear_fc2", ""): "mlp.down_proj",
    ("mlp.shared_experts.linear_fc1_gate", ""): "mlp.shared_expert.gate_proj",
    ("mlp.shared_experts.linear_fc1_up", ""): "mlp.shared_expert.up_proj",
    ("mlp.shared_experts.linear_fc2", ""): "mlp.shared_expert.down_proj",
    ("mlp.router", ""): "mlp.gate",
}
# Our expert module -> (PEFT's ParamWrapper under mlp.experts: gate_up_proj is the inner one, its target parameter).
PEFT_EXPERTS = {
    "linear_fc1_gate": ("mlp.experts.base_layer", "mlp.experts.gate_up_proj"),
    "linear_fc1_up": ("mlp.experts.base_layer", "mlp.experts.gate_up_proj"),
    "linear_fc2": ("mlp.experts", "mlp.experts.down_proj"),
}
PEFT_ROUTER = "mlp.gate.weight"  # the router's target parameter
DENSE_MLP = {"linear_fc1": ("linear_fc1_gate", "linear_fc1_up"), "linear_fc2": ("linear_fc2",)}
EXPERTS = ("mlp.experts.linear_fc1_gate", "mlp.experts.linear_fc1_up", "mlp.experts.linear_fc2")


def target_paths(target: str, moe_layer: bool, shared: bool) -> tuple[str, ...]:
    """Our modules (under decoder.layers.N.) a target (megatron-core name) adapts in a dense or MoE layer."""
    if target == "linear_qkv":
        return ("self_attention.linear_qkv",)
    if target == "linear_proj":
        return ("self_attention.linear_proj",)
    if target in DENSE_MLP:
        if moe_layer and not shared:
            return ()
        prefix = "mlp.shared_experts." if moe_layer else "mlp."
        return tuple(prefix + m for m in DENSE_MLP[target])
    if not moe_layer:
        return ()
    return EXPERTS if target == "experts" else ("mlp.router",)


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


def adapter_shapes(path: str, cfg, r: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the adapter parameters our module ``path`` (under decoder.layers.N.) carries."""
    m, h = cfg.moe, cfg.hidden_size
    if path == "self_attention.linear_qkv":
        rows = {"q": cfg.num_attention_heads * cfg.head_dim, "k": cfg.num_query_groups * cfg.head_dim,
                "v": cfg.num_query_groups * cfg.head_dim}
        out = {}
        for part in QKV_PARTS:
            a, b = adapter_names(part)
            out[a], out[b] = (r, h), (rows[part], r)
        return out
    if path in EXPERTS:
        e, f = m.num_moe_experts, m.expert_ffn(cfg.ffn_hidden_size)
        rows, cols = (h, f) if path.endswith("linear_fc2") else (f, h)
        # linear_fc1_up shares linear_fc1_gate's A: one A per expert for the fused fc1, as PEFT's gate_up_proj.
        a = {} if path.endswith("linear_fc1_up") else {"lora_A": (e, r, cols)}
        return {**a, "lora_B": (e, rows, r)}
    if path == "mlp.router":
        rows, cols = m.num_moe_experts, h
    elif path.startswith("mlp.shared_experts."):
        s = m.moe_shared_expert_intermediate_size
        rows, cols = (h, s) if path.endswith("linear_fc2") else (s, h)
    else:
        rows, cols = linear_shapes(cfg)[path]
    return {"lora_A": (r, cols), "lora_B": (rows, r)}


def add_adapters(model: nn.Module, lora: LoraConfig) -> int:
    """Adapters on every targeted module the model (or pipeline stage) holds, on the modules' device (meta when
    built there); returns how many modules got one."""
    cfg = model.config
    count = 0
    for layer in model.decoder.layers.values():
        moe = isinstance(layer.mlp, MoELayer)
        for target in lora.targets:
            for path in target_paths(target, moe, moe and layer.mlp.shared_experts is not None):
                _attach(layer, path, lora, cfg)
                count += 1
    return count


def _attach(layer: nn.Module, path: str, lora: LoraConfig, cfg) -> None:
    module = layer.get_submodule(path)
    device = module.weight.device
    for name, shape in adapter_shapes(path, cfg, lora.rank).items():
        module.register_parameter(name, nn.Parameter(torch.empty(shape, device=device)))
    if isinstance(module, GroupedLinear):
        owner_of_a = layer.get_submodule("mlp.experts.linear_fc1_gate") if path.endswith("_up") else module
        module.adapter = partial(_expert_delta, scale=lora.scale, owner_of_a=owner_of_a)
    elif isinstance(module, TopKRouter):
        module.adapter = partial(_router_delta, scale=lora.scale)
    else:
        fused = path == "self_attention.linear_qkv"
        module._lora = _Spec(lora.scale, lora.dropout, QKV_PARTS if fused else ("",), cfg.head_dim if fused else 0)
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


def _router_delta(module: TopKRouter, x: torch.Tensor, scale: float) -> torch.Tensor:
    return F.linear(F.linear(x, module.lora_A), module.lora_B) * scale


def _expert_delta(module: GroupedLinear, x: torch.Tensor, groups: Union[torch.Tensor, list[int]], scale: float,
                  owner_of_a: GroupedLinear) -> torch.Tensor:
    """Rows x sorted by (this rank's) expert -> scale * x A_e^T B_e^T per row's expert e, over the same groups
    as the base GEMM: int32 offsets (torch._grouped_mm) or host ends (a loop)."""
    a, b = local_experts(owner_of_a.lora_A), local_experts(module.lora_B)
    if isinstance(groups, torch.Tensor):
        a, b = a.to(x.dtype), b.to(x.dtype)
        # _grouped_mm wants rows of 16 bytes: zero rows of A and columns of B add nothing (and get no gradient).
        pad = -a.shape[1] % (16 // x.element_size())
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        h = torch._grouped_mm(x, a.transpose(-2, -1), offs=groups)
        return torch._grouped_mm(h, b.transpose(-2, -1), offs=groups) * scale
    parts, start = [], 0
    for e, end in enumerate(groups):
        parts.append(F.linear(F.linear(x[start:end], a[e]), b[e]))
        start = end
    return torch.cat(parts) * scale


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
                bound = 1.0 / math.sqrt(p.shape[-1])  # fan-in: an expert adapter's A is [E, r, in]
                full.uniform_(-bound, bound, generator=gen)
        assign_full(p, full)


def trainable_count(model_cfg, lora: LoraConfig, per_token: bool = False) -> int:
    """Adapter parameters of the whole model (every layer, every stage); ``per_token``: those one token's
    matmuls use (of the routed experts' adapters, its top-k experts')."""
    if not lora.enabled:
        return 0
    m = model_cfg.moe
    moe_layers = set(m.moe_layers(model_cfg.num_layers)) if m.enabled else set()
    shared = bool(m.moe_shared_expert_intermediate_size)
    total = 0
    for i in range(model_cfg.num_layers):
        for target in lora.targets:
            for path in target_paths(target, i in moe_layers, shared):
                n = sum(math.prod(s) for s in adapter_shapes(path, model_cfg, lora.rank).values())
                total += n * m.moe_router_topk // m.num_moe_experts if per_token and path in EXPERTS else n
    return total


_OURS = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.lora_([AB])(?:_([qkv]))?")
_PEFT_LAYERS = "base_model.model.model.layers."


def peft_name(ours: str) -> str:
    """Our adapter FQN (decoder.layers.N.<module>.lora_A[_q]) -> PEFT's name in adapter_model.safetensors (for
    an expert adapter: the PEFT tensor it is part of, see the module docstring)."""
    m = _OURS.fullmatch(ours)
    if m is None:
        raise ValueError(f"{ours} is not an adapter parameter")
    layer, module, factor, part = m[1], m[2], m[3], m[4] or ""
    theirs = (PEFT_EXPERTS[module.removeprefix("mlp.experts.")][0] if module in EXPERTS
              else PEFT_MODULES[module, part])
    return f"{_PEFT_LAYERS}{layer}.{theirs}.lora_{factor}.weight"


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full adapter tensors by our names -> PEFT's adapter_model.safetensors tensors: an expert A [E, r, in]
    -> [E*r, in] (expert-major); an expert B [E, out, r] -> [out, r*E] (rank-major, expert-minor), gate's and
    up's B one tensor, gate's rows first (gate_up_proj's [gate; up])."""
    out, fused = {}, {}
    for name, t in tensors.items():
        key = peft_name(name)
        if not _is_expert(name):
            out[key] = t
        elif ".lora_A" in name:
            out[key] = t.reshape(-1, t.shape[-1])
        else:
            fused.setdefault(key, []).append((not name.endswith("linear_fc1_gate.lora_B"), t))
    for key, parts in fused.items():
        b = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=1)
        out[key] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
    return out


def from_peft(name: str, shape: tuple[int, ...], read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Our adapter tensor ``name`` (full ``shape``) from PEFT's tensors (``read``: PEFT name -> tensor), the
    inverse of to_peft. A shape that does not fit raises ValueError."""
    t = read(peft_name(name))
    if not _is_expert(name):
        return t
    if ".lora_A" in name:
        if tuple(t.shape) != (shape[0] * shape[1], shape[2]):
            raise ValueError(f"{list(t.shape)}, not [{shape[0] * shape[1]}, {shape[2]}]")
        return t.reshape(shape)
    experts, rows, r = shape
    if t.dim() != 2 or t.shape[1] != r * experts:
        raise ValueError(f"{list(t.shape)}, not [rows, {r * experts}]")
    full = t.reshape(t.shape[0], r, experts).permute(2, 0, 1)  # [E, all rows, r]
    start = rows if name.endswith("linear_fc1_up.lora_B") else 0
    if start + rows > full.shape[1]:
        raise ValueError(f"{list(t.shape)} has fewer than {start + rows} rows")
    return full[:, start:start + rows]


def peft_targets(names, moe: bool) -> tuple[list[str], list[str]]:
    """PEFT's (target_modules, target_parameters) for adapters of these names. nn.Linear modules by their HF leaf
    name, except, in an MoE model, the MLP's (dense layers' and shared experts'): peft 0.21.2 re-maps target_modules
    gate_proj/up_proj/down_proj of a Qwen3-MoE model to its fused experts (transformers_weight_conversion.py,
    for adapters trained on transformers 4), so those go by parameter (``gate_proj.weight``: a 2-D ParamWrapper,
    the same tensor names and B A as lora.Linear); the experts and router as parameters always."""
    modules, params = set(), set()
    for name in names:
        m = _OURS.fullmatch(name)
        module, part = m[2], m[4] or ""
        if module in EXPERTS:
            params.add(PEFT_EXPERTS[module.removeprefix("mlp.experts.")][1])
        elif module == "mlp.router":
            params.add(PEFT_ROUTER)
        else:
            leaf = PEFT_MODULES[module, part].split(".")[-1]
            if moe and module.startswith("mlp."):
                params.add(f"{leaf}.weight")
            else:
                modules.add(leaf)
    return sorted(modules), sorted(params)


def adapter_param_names(model_cfg, lora: LoraConfig) -> list[str]:
    """Our adapter FQNs of the whole model (a meta-device build)."""
    from trainer.model import GPTModel

    with torch.device("meta"):
        model = GPTModel(model_cfg)
        add_adapters(model, lora)
    return [n for n, _ in model.named_parameters() if is_adapter(n)]


def check_lora(cfg, dims) -> None:
    """What LoRA does not compose with yet, refused before anything is allocated."""
    lora = cfg.model.lora
    if not lora.enabled:
        return
    named = [t for t in MOE_TARGETS if t in lora.target_modules]
    if named and not cfg.model.moe.enabled:
        raise ConfigError(f"model.lora.target_modules has {named[0]!r} but the model is dense (no "
                          f"model.moe.num_moe_experts): target {list(LORA_TARGETS)} or all-linear")
    if cfg.model.moe.enabled and trainable_count(cfg.model, lora) == 0:
        raise ConfigError(f"model.lora.target_modules={list(lora.target_modules)} adapts nothing in this model: its "
                          f"MoE layers have no dense MLP (linear_fc1/linear_fc2 are shared experts' there, and it has "
                          f"none); target experts (the routed experts), router or attention")
    by_parameter = [t for t in lora.targets if t not in ("linear_qkv", "linear_proj")]
    if cfg.model.moe.enabled and by_parameter and lora.dropout:
        raise ConfigError(f"model.lora.dropout={lora.dropout} with an MoE model and target {by_parameter[0]}: PEFT "
                          f"adapts an MoE model's experts, router and MLPs as parameters (target_parameters: B A "
                          f"added to the weight), which has no dropout, so neither do we; use model.lora.dropout=0 "
                          f"or target only linear_qkv and linear_proj")
    if cfg.trainer.precision == "fp8":
        raise ConfigError("model.lora with trainer.precision=fp8 is not supported: the adapters would run beside "
                          "torchao's Float8Linear, which is not built; use trainer.precision=bf16")
    if lora.base_dtype == "bf16" and cfg.trainer.precision != "bf16":
        raise ConfigError(f"model.lora.base_dtype=bf16 needs trainer.precision=bf16 (got "
                          f"{cfg.trainer.precision}): the base's matmuls then run in bf16 on its bf16 weights")
    if lora.base_quant == "nf4":
        from trainer.qlora import check_nf4

        check_nf4(cfg, dims)
    if lora.dropout and dims.tp > 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout} with parallel.tp={dims.tp}: the dropout masks of "
                          f"the replicated adapter inputs would differ between tensor-parallel ranks; use "
                          f"model.lora.dropout=0 under tensor parallelism")


# ------------------------------------------------------------------------------------------------- PEFT

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_peft_config(path, lora: LoraConfig, model_cfg) -> dict:
    """A PEFT adapter's adapter_config.json, checked against model.lora on this model (ConfigError naming both
    sides)."""
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
              "target_modules": sorted(raw.get("target_modules") or []),
              "target_parameters": sorted(raw.get("target_parameters") or [])}
    modules, params = peft_targets(adapter_param_names(model_cfg, lora), model_cfg.moe.enabled)
    ours = {"rank": lora.rank, "alpha": lora.alpha, "use_rslora": lora.use_rslora,
            "target_modules": modules, "target_parameters": params}
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
            try:
                t = from_peft(name, tuple(p.shape), f.get_tensor)
            except ValueError as e:
                raise ConfigError(f"model.lora.init_from={path}: {theirs} is {e}, which does not give {name} "
                                  f"{list(p.shape)}") from None
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(f"model.lora.init_from={path}: {theirs} is {list(t.shape)}, but {name} is "
                                  f"{list(p.shape)}")
            assign_full(p, t.to(device=p.device, dtype=torch.float32))


def peft_config(lora: LoraConfig, base: Optional[str], names, moe: bool = False) -> dict:
    """adapter_config.json as PEFT writes it, with what PEFT needs to load the adapter (of these adapters)."""
    modules, params = peft_targets(names, moe)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
            "target_modules": modules, "target_parameters": params or None, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True if lora.init == "default" else "gaussian", "inference_mode": True,
            "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(tensors: dict, lora: LoraConfig, base: Optional[str], out, moe: bool = False) -> None:
    """Our adapters (full tensors by our names) as a PEFT adapter directory, written under a hidden name and
    renamed when complete: adapter_config.json and adapter_model.safetensors in PEFT's names."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from checkpoint_convert.safetensors_files import staged_dir

    with staged_dir(Path(out), overwrite=True) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in to_peft(tensors).items()},
                  str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = peft_config(lora, base, tensors, moe)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ merging


def merge_weight(name: str, weight: torch.Tensor, adapters: dict, lora: LoraConfig, cfg) -> torch.Tensor:
    """A base weight (our name, full tensor) with its adapters merged in: W + scale * B A, in fp32, returned in
    W's dtype; linear_qkv's three adapters interleaved per query group like its rows. Unadapted: W itself."""
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or not any(k.startswith(module + ".lora_") for k in adapters):
        return weight
    if module.endswith("mlp.experts.linear_fc1_up"):  # gate's A is up's too; [E, F, r] @ [E, r, H] per expert
        a = adapters[module.removesuffix("_up") + "_gate.lora_A"]
        delta = adapters[f"{module}.lora_B"].float() @ a.float()
    elif module.endswith("linear_qkv"):
        from checkpoint_convert.mapping import interleave_qkv

        parts = [adapters[f"{module}.lora_B_{p}"].float() @ adapters[f"{module}.lora_A_{p}"].float()
                 for p in QKV_PARTS]
        delta = interleave_qkv(*parts, cfg.num_query_groups, cfg.head_dim)
    else:
        delta = adapters[f"{module}.lora_B"].float() @ adapters[f"{module}.lora_A"].float()
    return (weight.float() + lora.scale * delta).to(weight.dtype)
