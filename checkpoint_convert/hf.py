"""HF transformers checkpoints (config.json + safetensors) <-> meshtron's GPTModel.

Names and tensor transforms come from the family tables in `checkpoint_convert.models`; this module only
handles the HF file formats. Weights are read tensor by tensor from memory-mapped safetensors and written
as safetensors; nothing from outside is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, GenerationConfig, PreTrainedConfig

from checkpoint_convert.hf_moe import moe_from_hf, moe_to_hf
from checkpoint_convert.mapping import Unit, rename
from checkpoint_convert.models.registry import Family, family, family_for_hf
from checkpoint_convert.safetensors_files import (DEFAULT_MAX_SHARD_BYTES, SAFE_INDEX, SAFE_WEIGHTS,
                                                  PlannedShardWriter, ShardWriter, byte_progress, check_out_dir,
                                                  dtype_name, open_safetensors, read_index, staged_dir)
from trainer.config import ModelConfig, RopeScalingConfig
from trainer.errors import ConfigError, DamagedFileError
from trainer.families import (WINDOW_LAYER_TYPES, WINDOW_MAX_WINDOW_LAYERS, WINDOW_SLIDING_WINDOW,
                              WINDOW_USE_SLIDING_WINDOW)
from trainer.model.gpt import ADAPTER, VOCAB_PARAMS
from trainer.model.init import assign_full, clean_fqn, local_region

# Keys a config.json may omit; the installed transformers config class supplies them, as from_pretrained would.
_DEFAULTED_KEYS = ("hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                   "initializer_range", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                   "max_window_layers")

# ------------------------------------------------------------------------------------- config.json


def read_hf_config(path: Union[str, Path], base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig from an HF checkpoint directory's config.json (transformers 4.x or 5.x layout).

    Shape fields come from the file; everything else (name, ...) from `base`. hf_path is set to `path`.
    """
    path = Path(path)
    raw = read_config_json(path)
    base = base or ModelConfig(name=path.name)
    return dataclasses.replace(model_config_from_hf(raw, base), hf_path=str(path))


def read_config_json(path: Path) -> dict:
    """An HF directory's config.json as a dict, or a ConfigError / DamagedFileError saying what is wrong."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; expected an HF checkpoint directory (config.json + "
                          f"*.safetensors)")
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path} has no config.json; expected an HF checkpoint directory (config.json + "
                          f"*.safetensors)")
    try:
        raw = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise DamagedFileError(file, f"not valid JSON ({' '.join(str(err).split())})",
                               "it is truncated or corrupt: copy or download it again") from None
    if not isinstance(raw, dict):
        raise DamagedFileError(file, f"holds a JSON {type(raw).__name__}, not an object",
                               "expected transformers' config.json; copy or download it again")
    return raw


def model_config_from_hf(raw: Mapping[str, Any], base: Optional[ModelConfig] = None) -> ModelConfig:
    fam = family_for_hf(raw.get("model_type"), raw.get("architectures"))
    defaults = AutoConfig.for_model(fam.hf_model_type)
    hf = {**{k: getattr(defaults, k) for k in _DEFAULTED_KEYS if hasattr(defaults, k)}, **raw}
    _check_supported(hf, fam)

    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    theta, scaling = _rope(hf)
    cfg = dataclasses.replace(
        base or ModelConfig(),
        family=fam.name,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        # Canonical form: only an explicit head_dim that differs from hidden/heads is kept (Qwen3 style).
        kv_channels=head_dim if head_dim and head_dim * heads != hidden else None,
        max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=hf["rms_norm_eps"],
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        # Qwen2 hard-codes bias=True on q/k/v (Qwen2-MoE has a qkv_bias key); older configs do not even have an
        # attention_bias key.
        add_qkv_bias=fam.qkv_bias and bool(hf.get("qkv_bias", True)),
        qk_layernorm=fam.qk_norm,
        sliding_window=_sliding_window(hf, fam),
        init_std=hf["initializer_range"],
        moe=moe_from_hf(hf, defaults, fam.name, (base or ModelConfig()).moe, hf["num_hidden_layers"]),
    )
    cfg.validate()
    return cfg


def _check_supported(hf: Mapping[str, Any], fam: Family) -> None:
    if hf["hidden_act"] != "silu":
        raise ConfigError(f"HF hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
    # Llama/Qwen3's attention_bias also puts a bias on o_proj, which Megatron's layout has no place for.
    if not fam.qkv_bias and hf.get("attention_bias"):
        raise ConfigError(f"HF attention_bias=true is not supported for {fam.name} (it adds a bias to o_proj); "
                          f"only Qwen2's q/k/v biases are")
    if hf.get("mlp_bias"):
        raise ConfigError("HF mlp_bias=true is not supported; the MLP has no biases")


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[RopeScalingConfig]]:
    """(rope theta, llama3 scaling or None) from either config generation.

    transformers 5 writes `rope_parameters` with rope_theta inside; < 5 writes top-level `rope_theta`
    and `rope_scaling` (keyed "rope_type", or "type" in older files), None meaning unscaled.
    """
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"HF partial_rotary_factor={params['partial_rotary_factor']} is not supported; "
                          "rotary must cover the whole head")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"HF rope type {rope_type!r} is not supported; supported: ['default', 'llama3']")
    scaling = RopeScalingConfig(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when the key is missing.
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf["max_position_embeddings"])),
    )
    return theta, scaling


def _sliding_window(hf: Mapping[str, Any], fam: Family) -> Optional[int]:
    if fam.window == WINDOW_SLIDING_WINDOW:
        return hf.get("sliding_window") or None
    if fam.window == WINDOW_USE_SLIDING_WINDOW:  # one window for every layer when switched on
        return (hf.get("sliding_window") or None) if hf.get("use_sliding_window") else None
    if fam.window == WINDOW_LAYER_TYPES and hf.get("use_sliding_window") and not hf.get("layer_types"):
        raise ConfigError(f"HF {fam.name} use_sliding_window=true (alternate layers windowed) is not supported")
    if fam.window not in (WINDOW_MAX_WINDOW_LAYERS, WINDOW_LAYER_TYPES) or not hf.get("use_sliding_window"):
        return None  # Qwen configs carry a sliding_window value even when it is switched off
    window = hf.get("sliding_window") or None
    n = hf["num_hidden_layers"]
    # Qwen windows only layers >= max_window_layers; meshtron has one attention kind for all layers.
    kinds = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf["max_window_layers"] else "full_attention" for i in range(n)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) == {"sliding_attention"}:
        return window
    raise ConfigError(f"HF {fam.name} config mixes full and sliding-window layers (max_window_layers="
                      f"{hf.get('max_window_layers')}, layer_types={kinds}); only all-or-none is supported")


def hf_config(cfg: ModelConfig, **overrides: Any) -> PreTrainedConfig:
    """The installed transformers' config object for `cfg`. `overrides` set extra HF keys, e.g. token ids."""
    fam = family(cfg.family)
    kwargs: dict[str, Any] = dict(
        architectures=[fam.hf_architecture],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_std,
        rope_parameters=_rope_parameters(cfg),
    )
    kwargs.update(moe_to_hf(cfg, fam.name))  # Mixtral's intermediate_size is its experts' width
    if fam.window == WINDOW_SLIDING_WINDOW:
        kwargs["sliding_window"] = cfg.sliding_window or None
    elif fam.window == WINDOW_USE_SLIDING_WINDOW:
        kwargs.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None)
    elif fam.window == WINDOW_MAX_WINDOW_LAYERS or (fam.window == WINDOW_LAYER_TYPES and not cfg.sliding_window):
        kwargs.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                      max_window_layers=0 if cfg.sliding_window else cfg.num_layers)
    elif cfg.sliding_window:
        raise ConfigError(f"model.sliding_window={cfg.sliding_window} cannot be written as an HF "
                          f"{fam.name} config; use family mistral")
    if fam.qkv_bias_key:  # its q/k/v biases are a config key
        kwargs["qkv_bias"] = cfg.add_qkv_bias
    elif cfg.add_qkv_bias != fam.qkv_bias or cfg.qk_layernorm != fam.qk_norm:
        raise ConfigError(f"model.add_qkv_bias={cfg.add_qkv_bias} / qk_layernorm={cfg.qk_layernorm} do not "
                          f"match HF family {fam.name!r} (qwen2 has qkv bias, qwen3 has q/k norms)")
    kwargs.update(overrides)
    return AutoConfig.for_model(fam.hf_model_type, **kwargs)


def hf_config_dict(cfg: ModelConfig, **overrides: Any) -> dict:
    """config.json contents as the installed transformers' save_pretrained writes them."""
    return hf_config(cfg, **overrides).to_diff_dict()


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rotary_base}
    return {"rope_theta": cfg.rotary_base, **dataclasses.asdict(cfg.rope_scaling)}


# ----------------------------------------------------------------------------------------- weights


class SafetensorsDir:
    """Tensors of an HF directory by name, memory-mapped: one model.safetensors or an index of shards."""

    def __init__(self, path: Path, stack: ExitStack):
        index = path / SAFE_INDEX
        if index.exists():
            files = {name: path / file for name, file in read_index(index).items()}
        elif (path / SAFE_WEIGHTS).exists():
            files = None
        else:
            raise ConfigError(f"{path} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}; expected an HF checkpoint "
                              f"with safetensors weights (pytorch_model.bin is not read: it is a pickle)")
        handles = {}
        for file in sorted(set(files.values()) if files else [path / SAFE_WEIGHTS]):
            handles[file] = open_safetensors(file, stack)  # every header checked before any tensor is read
        if files is None:
            files = {name: path / SAFE_WEIGHTS for name in handles[path / SAFE_WEIGHTS].keys()}
        self.files, self.handles = files, handles

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.files[name]].get_tensor(name)

    def get_slice(self, name: str):
        """safetensors' lazy view of one tensor: its shape, and only the indexed part read from the file."""
        return self.handles[self.files[name]].get_slice(name)


def check_hf_checkpoint(path: Union[str, Path]) -> None:
    """What loading an HF directory would refuse, found without loading it: config.json, and every safetensors
    file's header (a truncated or corrupt file fails there). For commands whose loading is transformers'."""
    read_hf_config(path)
    with ExitStack() as stack:
        SafetensorsDir(Path(path), stack)


def ignored_hf_tensor(name: str, cfg: ModelConfig) -> bool:
    # Old checkpoints saved the rotary buffer; tied ones sometimes still carry a copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: Union[str, Path], partial: bool = False) -> None:
    """Copy an HF checkpoint's weights into an already-built GPTModel, in place, one tensor at a time.

    Every model parameter must be filled and every checkpoint tensor used (rotary buffers aside), unless
    `partial`: a pipeline stage holds only some of the model, so the rest of the checkpoint is skipped.
    Parameters already sharded (DTensors) receive only this rank's part, and for 1:1 renames only that part
    is read from the file (safetensors slicing), so no rank reads or holds the whole model.
    """
    cfg: ModelConfig = model.config
    # LoRA's adapters (trainer/lora.py) are not in an HF checkpoint: they are initialised or loaded from PEFT.
    params = {clean_fqn(n): p for n, p in model.named_parameters() if ADAPTER not in n}
    if cfg.tie_word_embeddings and "output_layer.weight" in params:
        # A pipeline's last stage holds its own copy of tied embeddings: fill it from the embedding.
        params["embedding.word_embeddings.weight"] = params.pop("output_layer.weight")
    used: set[str] = set()
    with ExitStack() as stack:
        ckpt = SafetensorsDir(Path(path), stack)
        for unit in family(cfg.family).table.units(params, cfg):
            missing = [n for n in unit.theirs if n not in ckpt]
            if "lm_head.weight" in missing:
                raise ConfigError(f"{path}: lm_head.weight is missing but the config has tie_word_embeddings=false")
            if missing:
                raise ConfigError(f"{path}: tensors {missing} are missing (needed for {list(unit.ours)}); the weights do "
                                  "not belong to this config.json, or a shard is missing: re-download or re-export")
            if _is_rename(unit):
                _load_renamed(ckpt, unit.theirs[0], unit.ours[0], params[unit.ours[0]], cfg, path)
            elif unit.rule.per_expert:
                _load_stacked(ckpt, unit, params[unit.ours[0]], path)
            else:
                _load_converted(ckpt, unit, params, cfg, path)
            used.update(unit.theirs)
        unexpected = sorted(n for n in ckpt.files if n not in used and not ignored_hf_tensor(n, cfg))
    if unexpected and not partial:
        raise ConfigError(f"{path}: tensors the {cfg.family} model has no place for: {unexpected}; the weights do "
                          "not belong to this config.json (another model_type or shape?)")


def _is_rename(unit: Unit) -> bool:
    return len(unit.ours) == len(unit.theirs) == 1 and unit.rule == rename(unit.rule.ours[0], unit.rule.theirs[0])


def _load_renamed(ckpt: SafetensorsDir, theirs: str, ours: str, param: torch.Tensor, cfg: ModelConfig,
                  path) -> None:
    """A 1:1 tensor: read only the rows and columns of this rank's part, zeros for padded vocabulary rows."""
    view = ckpt.get_slice(theirs)
    shape = tuple(view.get_shape())
    full = tuple(param.shape)
    padded = ours in VOCAB_PARAMS and shape[0] < full[0] and shape[1:] == full[1:]
    if shape != full and not padded:
        raise ConfigError(f"{path}: {theirs} {list(shape)} gives {ours} of shape {list(shape)}, "
                         f"but the model's is {list(full)}")
    region = local_region(param)
    target = param.to_local() if region is not None else param
    region = region or [(0, n) for n in full]
    (r0, r1), rest = region[0], region[1:]
    stored = max(0, min(r1, shape[0]) - r0)  # rows of the part that the file has (the rest are padding)
    if stored:
        index = (slice(r0, r0 + stored), *(slice(a, b) for a, b in rest))
        target[:stored].copy_(view[index])
    target[stored:].zero_()


def _load_stacked(ckpt: SafetensorsDir, unit: Unit, param: torch.Tensor, path) -> None:
    """Experts stacked on dim 0 from one tensor per expert: only this rank's experts (dim 0 of its part) are
    opened, and of each only the rows and columns of the part are read, so a rank holding some experts (or an
    FSDP shard of them) never reads the others."""
    full = tuple(param.shape)
    region = local_region(param) or [(0, n) for n in full]
    target = param.to_local() if isinstance(param, DTensor) else param
    (e0, e1), rest = region[0], region[1:]
    for e in range(e0, e1):
        view = ckpt.get_slice(unit.theirs[e])
        shape = tuple(view.get_shape())
        if shape != full[1:]:
            raise ConfigError(f"{path}: {unit.theirs[e]} {list(shape)} does not fit expert {e} of {unit.ours[0]}: "
                             f"the model's experts are {list(full[1:])}")
        target[e - e0].copy_(view[tuple(slice(a, b) for a, b in rest)])


def _load_converted(ckpt: SafetensorsDir, unit: Unit, params: Mapping[str, torch.Tensor], cfg: ModelConfig,
                    path) -> None:
    """A unit with a transform (the fused QKV): its inputs are read whole, i.e. one layer's q, k and v
    projections (weights or biases), fused, and this rank's part of the result is kept."""
    theirs = [ckpt.get(n) for n in unit.theirs]
    try:
        ours = unit.convert_to_ours(theirs, cfg)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: cannot convert {_shapes(unit.theirs, theirs)} into "
                         f"{_shapes(unit.ours, [params[n] for n in unit.ours])}: {e}") from e
    for name, tensor in ours.items():
        tensor = pad_vocab_rows(name, tensor, params[name].shape)
        if tensor.shape != params[name].shape:
            raise ConfigError(f"{path}: {_shapes(unit.theirs, theirs)} gives {name} of shape "
                             f"{list(tensor.shape)}, but the model's is {list(params[name].shape)}")
        assign_full(params[name], tensor)  # this rank's part when the model is already sharded


def pad_vocab_rows(name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero rows appended to a vocabulary tensor to fill the model's padded vocabulary."""
    extra = shape[0] - tensor.shape[0]
    if name not in VOCAB_PARAMS or extra <= 0 or tensor.shape[1:] != shape[1:]:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])


def _shapes(names, tensors) -> str:
    return ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, tensors))


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """meshtron names and layouts -> HF names and layouts (contiguous CPU tensors, optionally cast)."""
    if cfg.tie_word_embeddings and "output_layer.weight" in state:
        raise ValueError("state dict has output_layer.weight but the config has tie_word_embeddings=true")
    out = {}
    for unit in family(cfg.family).table.units(state, cfg):
        out.update(_unit_to_hf(unit, [state[n] for n in unit.ours], cfg, dtype))
    return out


def _unit_to_hf(unit: Unit, tensors: Sequence[torch.Tensor], cfg: ModelConfig,
                dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    # Padded vocabulary rows (for tensor parallelism) are meshtron's own; HF gets exactly vocab_size.
    tensors = [t[:cfg.vocab_size] if n in VOCAB_PARAMS else t for n, t in zip(unit.ours, tensors)]
    out = {}
    for name, t in unit.convert_to_theirs(tensors, cfg).items():
        t = t.detach() if t.is_meta else t.detach().cpu()
        out[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return out


def hf_layout(layout: Mapping[str, tuple[torch.Size, torch.dtype]], cfg: ModelConfig,
              dtype: Optional[torch.dtype] = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """HF name -> (shape, dtype) of what to_hf_state_dict makes of tensors shaped like `layout` (our names
    in model order), found by converting meta tensors: no data is touched."""
    state = {n: torch.empty(shape, dtype=dt, device="meta") for n, (shape, dt) in layout.items()}
    return {n: (t.shape, t.dtype) for n, t in to_hf_state_dict(state, cfg, dtype).items()}


def save_hf(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    cfg: ModelConfig,
    out_dir: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    config_overrides: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write an HF checkpoint directory: safetensors (sharded with an index above max_shard_bytes),
    config.json and generation_config.json. Returns the directory.

    Everything is written into a hidden sibling directory first and renamed at the end, so an
    interrupted export never looks complete. `config_overrides` sets extra HF config keys (token ids).
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = to_hf_state_dict(state, cfg, dtype)
    config = hf_config(cfg, **(config_overrides or {}))
    config.dtype = dtype_name(t.dtype for t in tensors.values())
    with staged_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, t in tensors.items():
            writer.add(name, t)
        writer.finish()
        write_config_files(tmp, config)
    return out


def save_hf_stream(
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: Mapping[str, tuple[torch.Size, torch.dtype]],
    cfg: ModelConfig,
    out_dir: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    config_overrides: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
    extra_files: Optional[Callable[[Path], None]] = None,
) -> Path:
    """save_hf from (our name, full tensor) pairs arriving one at a time, in the order of `layout` (every
    model tensor's name -> shape, dtype): the same files byte for byte, but each conversion unit is converted
    and written as soon as its tensors have arrived, so nothing is held beyond one unit (one tensor for all
    of Llama's units) and the HF tensors it makes. `extra_files(dir)` adds files (a tokenizer) to the directory
    before it takes its final name."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if cfg.tie_word_embeddings and "output_layer.weight" in layout:
        raise ValueError("layout has output_layer.weight but the config has tie_word_embeddings=true")
    plan = hf_layout(layout, cfg, dtype)
    config = hf_config(cfg, **(config_overrides or {}))
    config.dtype = dtype_name(dt for _, dt in plan.values())
    units = {n: u for u in family(cfg.family).table.units(layout, cfg) for n in u.ours}
    with staged_dir(out, overwrite) as tmp:
        writer = PlannedShardWriter(tmp, plan, max_shard_bytes)
        pending: dict[str, torch.Tensor] = {}
        with byte_progress(writer.total, progress, "export hf") as bar:
            for name, t in tensors:
                if name not in layout or tuple(t.shape) != tuple(layout[name][0]):
                    raise ValueError(f"export got {name} {list(t.shape)}; the model's layout has "
                                     f"{list(layout[name][0]) if name in layout else 'no such tensor'}")
                pending[name] = t
                unit = units[name]
                del t  # the unit's tensors live in `pending` only, and leave it when written
                if all(n in pending for n in unit.ours):
                    bar.update(_write_unit(writer, _unit_to_hf(unit, [pending.pop(n) for n in unit.ours], cfg, dtype)))
        writer.finish()
        write_config_files(tmp, config)
        if extra_files is not None:
            extra_files(tmp)
    return out


def _write_unit(writer: PlannedShardWriter, tensors: dict[str, torch.Tensor]) -> int:
    """Writes and drops one unit's HF tensors (the dict is the only reference); returns their bytes."""
    nbytes = 0
    while tensors:
        name, t = tensors.popitem()
        writer.add(name, t)
        nbytes += t.numel() * t.element_size()
    return nbytes


def write_config_files(out: Path, config: PreTrainedConfig) -> None:
    """config.json (keys sorted) and generation_config.json from it, unless one is there already (copied
    from the source checkpoint)."""
    (out / "config.json").write_text(json.dumps(config.to_diff_dict(), indent=2, sort_keys=True) + "\n")
    if not (out / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(out)
