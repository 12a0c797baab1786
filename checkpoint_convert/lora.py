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
    save_peft_adapter(adapters, cfg.lora, run["hf_path"], out)
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
