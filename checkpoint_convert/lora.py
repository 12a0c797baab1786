"""A LoRA run's checkpoint (adapters only: trainer/lora.py) -> a PEFT adapter (``lora-to-peft``) or a full HF
model with the adapters merged into the base (``merge-lora``). The base is the one the run trained on: its
model.hf_path, or, for a base initialised from trainer.seed, that initialisation again."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from checkpoint_convert.meshtron import (checkpoint_config, model_tensor_meta, read_tensors, resolve_checkpoint,
                                         verify_checkpoint)
from checkpoint_convert.safetensors_files import check_out_dir
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.lora import is_adapter, merge_weight, save_peft_adapter

PathLike = Union[str, Path]


def lora_checkpoint(checkpoint: PathLike) -> tuple[Path, ModelConfig, dict, dict, dict[str, torch.Tensor]]:
    """(step directory, model config, HF token ids, run settings {hf_path, seed}, full adapters by our names)."""
    step = resolve_checkpoint(checkpoint)
    verify_checkpoint(step)
    cfg, ids = checkpoint_config(step)
    if not cfg.lora.enabled:
        raise ConfigError(f"checkpoint {step} is a full model's (model.lora.rank=0), not a LoRA run's: export it "
                          f"with meshtron-to-hf")
    raw = yaml.safe_load((step / "config.yaml").read_text()) or {}
    run = {"hf_path": (raw.get("model") or {}).get("hf_path"), "seed": (raw.get("trainer") or {}).get("seed", 1234)}
    meta = model_tensor_meta(step)
    adapters = read_tensors(step, meta, [n for n in meta if is_adapter(n)])
    if not adapters:
        raise ConfigError(f"checkpoint {step} holds no adapter tensors although its config has model.lora.rank="
                          f"{cfg.lora.rank}")
    return step, cfg, ids, run, adapters


def lora_to_peft(checkpoint: PathLike, out: PathLike) -> Path:
    step, cfg, _, run, adapters = lora_checkpoint(checkpoint)
    check_out_dir(Path(out))
    save_peft_adapter(adapters, cfg.lora, run["hf_path"], out, moe=cfg.moe.enabled)
    return Path(out)


def merge_lora(checkpoint: PathLike, out: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """The base model with the checkpoint's adapters merged in, as an HF directory (with the run's tokenizer).
    Holds the base model in memory once (on the CPU)."""
    from checkpoint_convert.hf import load_hf_weights, save_hf
    from trainer.model import GPTModel

    step, cfg, ids, run, adapters = lora_checkpoint(checkpoint)
    out = Path(out)
    check_out_dir(out)
    base = GPTModel(cfg, seed=run["seed"])
    if run["hf_path"]:
        if not Path(run["hf_path"]).is_dir():
            raise ConfigError(f"checkpoint {step} was trained on model.hf_path={run['hf_path']}, which is not a "
                              f"directory here; merge-lora needs that base model")
        load_hf_weights(base, run["hf_path"])
    else:
        base.init_weights(run["seed"])
    state = {n: merge_weight(n, t.detach(), adapters, cfg.lora, cfg) for n, t in base.state_dict().items()}
    save_hf(state, cfg, out, dtype=dtype, config_overrides=ids)
    hf = step / "hf"  # the run's tokenizer and chat template
    if hf.is_dir():
        for f in sorted(hf.iterdir()):
            if f.is_file() and f.name not in ("config.json", "generation_config.json") and f.suffix != ".safetensors":
                shutil.copyfile(f, out / f.name)
    return out


class PeftMerge:
    """A PEFT LoRA adapter merged into HF weights as they are read (hf-to-megatron --lora): W + scale * B A for
    each weight the adapter covers, in fp32, returned in W's dtype. Checked before anything is written: every
    adapter tensor must name a weight of the checkpoint."""

    PREFIX = "base_model.model."

    def __init__(self, adapter_dir: PathLike, hf_names: set[str]):
        import json

        from safetensors.torch import load_file

        from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        d = Path(adapter_dir)
        if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"--lora {d}: expected a PEFT adapter directory with {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}")
        raw = json.loads((d / ADAPTER_CONFIG).read_text())
        if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
            raise ConfigError(f"--lora {d}: only plain LoRA adapters merge (no DoRA, no per-module rank or alpha)")
        if raw.get("target_parameters"):
            raise ConfigError(f"--lora {d}: adapts parameters {raw['target_parameters']} (an MoE model's fused experts "
                              f"or router, PEFT's target_parameters), which hf-to-megatron does not merge (the HF "
                              f"files hold the experts one tensor each); merge it first (meshtron merge-lora, "
                              f"trainer.export_merged, or PEFT's merge_and_unload) and convert the merged model")
        r, alpha = raw["r"], raw["lora_alpha"]
        self.scale = alpha / (r ** 0.5 if raw.get("use_rslora") else r)
        tensors = load_file(str(d / ADAPTER_WEIGHTS))
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix(self.PREFIX).removesuffix(".lora_A.weight")
            b = key.replace(".lora_A.weight", ".lora_B.weight")
            if f"{module}.weight" not in hf_names or b not in tensors:
                raise ConfigError(f"--lora {d}: {key} has no weight {module}.weight in the HF checkpoint (or no "
                                  f"lora_B): the adapter belongs to another model")
            self.pairs[f"{module}.weight"] = (tensors[key], tensors[b])
        if not self.pairs:
            raise ConfigError(f"--lora {d}: no lora_A/lora_B tensors in {ADAPTER_WEIGHTS}")

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.pairs:
            return weight
        a, b = self.pairs[name]
        return (weight.float() + self.scale * (b.float() @ a.float())).to(weight.dtype)
