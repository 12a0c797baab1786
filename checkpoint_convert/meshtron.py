"""meshtron DCP checkpoints -> HF safetensors, in one process, needing nothing but the checkpoint.

A meshtron checkpoint (``checkpoints/step_<N>/``, see trainer/checkpoint.py) holds the model as DCP shards
keyed by the plain model's FQNs (so the training mesh does not matter), the run's resolved ``config.yaml``,
and ``hf/`` with the HF config.json, tokenizer and chat template the run started from.

The export reads model tensors only (never optimizer state), one layer at a time, converts each group
through the family table (`checkpoint_convert.hf.to_hf_state_dict`: un-pads the vocabulary, splits QKV,
drops the tied copy) and streams them into safetensors shards: peak memory is one output shard plus one
layer, not the model. Everything is written under a hidden temporary name and renamed at the end.

DCP's ``.metadata`` is a pickle that torch reads without ``weights_only``: only export checkpoints you
(or your cluster) wrote.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
import yaml
from omegaconf import OmegaConf

from checkpoint_convert.integrity import (COMPLETE, LATEST, DamagedCheckpoint, check_files, recorded_files,
                                          total_bytes)
from checkpoint_convert.hf import hf_config, model_config_from_hf, to_hf_state_dict, write_config_files
from checkpoint_convert.safetensors_files import (DEFAULT_MAX_SHARD_BYTES, SAFE_INDEX, SAFE_WEIGHTS, ShardWriter,
                                                  byte_progress, check_out_dir, staged_dir)
from trainer.config import ModelConfig
from trainer.errors import ConfigError

MODEL_PREFIX = "model."
# hf/ files that describe the model itself: rewritten from the checkpoint's config, never copied.
_MODEL_FILES = ("config.json", SAFE_WEIGHTS, SAFE_INDEX)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# ------------------------------------------------------------------------------------------ finding


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """The step directory to export: `path` itself (a complete ``step_<N>``), or the one a run's
    ``checkpoints/`` directory (or the run directory above it) points to with ``latest``. A directory of
    another kind (Megatron-LM, HF) is refused naming what it is and which command reads it."""
    from checkpoint_convert.detect import (MESHTRON_CHECKPOINTS, MESHTRON_INCOMPLETE, MESHTRON_STEP, MISSING,
                                           detect)

    p = Path(path).expanduser()
    expected = ("expected a complete checkpoint directory (checkpoints/step_<N>/ with a COMPLETE file) or a "
                "run's checkpoints/ directory with a 'latest' file")
    kind = detect(p)
    if kind.name == MISSING:
        raise ConfigError(f"--checkpoint {path}: no such directory; {expected}")
    if kind.name == MESHTRON_STEP:
        return p
    if kind.name == MESHTRON_INCOMPLETE:
        raise ConfigError(f"--checkpoint {path}: checkpoint is incomplete (no {COMPLETE} file: its save was "
                          "interrupted); export an earlier step_<N> instead")
    if kind.name == MESHTRON_CHECKPOINTS:
        for root in (p, p / "checkpoints"):
            if (root / LATEST).is_file():
                step = root / (root / LATEST).read_text().strip()
                if not (step / COMPLETE).is_file():
                    raise ConfigError(f"--checkpoint {path}: {root / LATEST} points to {step.name}, which is "
                                      f"missing or incomplete; pass a complete step_<N> directory instead")
                return step
        raise ConfigError(f"--checkpoint {path}: {kind.description} without a '{LATEST}' file: no save has "
                          f"completed; {expected}")
    if kind.command:  # a Megatron-LM or HF directory
        raise ConfigError(f"--checkpoint {kind.sentence()}")
    raise ConfigError(f"--checkpoint {path}: not a meshtron checkpoint ({kind.description}); {expected}")


def verify_checkpoint(step: Path, progress: bool = False) -> None:
    """Every file COMPLETE lists, with its size and CRC-32 (the run wrote them); DamagedCheckpoint (exit 2)
    naming the damaged files. A checkpoint from before file lists existed passes unchecked."""
    files = recorded_files(step)
    if files is None:
        return
    with byte_progress(total_bytes(files), progress, f"verify {step.name}") as bar:
        problems = check_files(step, files, checksums=True, on_bytes=bar.update)
    if problems:
        raise DamagedCheckpoint(f"checkpoint {step} is damaged: " + "; ".join(problems[:10])
                                + "; convert another step_<N>, or restore the files from a copy")


def checkpoint_config(step: Path) -> tuple[ModelConfig, dict]:
    """(the model's config, HF token ids) of a checkpoint: the run's resolved config.yaml if present
    (exactly the trained shape), else hf/config.json."""
    hf_json = step / "hf" / "config.json"
    raw = json.loads(hf_json.read_text()) if hf_json.is_file() else {}
    ids = {k: raw[k] for k in _TOKEN_IDS if raw.get(k) is not None}
    run_yaml = step / "config.yaml"
    if run_yaml.is_file():
        model = (yaml.safe_load(run_yaml.read_text()) or {}).get("model")
        if model:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model))
            cfg.hf_path = None
            cfg.validate()
            return cfg, ids
    if raw:
        return model_config_from_hf(raw, ModelConfig(name=step.parent.parent.name or "model")), ids
    raise ConfigError(f"checkpoint {step} has neither config.yaml nor hf/config.json: its model shape is unknown")


# ------------------------------------------------------------------------------------------ reading


def model_tensor_meta(step: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Model tensor name (without the ``model.`` prefix) -> (global shape, dtype), from DCP metadata."""
    meta = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    out = {}
    for key, m in meta.items():
        if key.startswith(MODEL_PREFIX) and hasattr(m, "size"):
            out[key[len(MODEL_PREFIX):]] = (m.size, m.properties.dtype)
    if not out:
        raise ConfigError(f"checkpoint {step} holds no model tensors (no '{MODEL_PREFIX}*' keys in .metadata)")
    return out


def read_tensors(step: Path, meta: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Full tensors for `names`, read from the DCP shards without a process group (only those byte ranges)."""
    state = {MODEL_PREFIX + n: torch.empty(meta[n][0], dtype=meta[n][1]) for n in names}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(step)), no_dist=True)
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items()}


def _layer_key(name: str) -> tuple:
    """HF's order: embedding, layers by index, final norm, output layer."""
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    return (0,) if name.startswith("embedding.") else (2, name)


def groups(names: Iterable[str]) -> Iterator[list[str]]:
    """Names grouped so each conversion unit (fused QKV, gate/up) is whole: one layer, or one top-level tensor."""
    by_key: dict[tuple, list[str]] = {}
    for n in names:
        by_key.setdefault(_layer_key(n), []).append(n)
    for key in sorted(by_key):
        yield sorted(by_key[key])


def load_meshtron_checkpoint(path: Union[str, Path]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, the whole model state dict as saved: meshtron names, vocabulary rows still padded)."""
    step = resolve_checkpoint(path)
    verify_checkpoint(step)
    cfg, _ = checkpoint_config(step)
    meta = model_tensor_meta(step)
    return cfg, read_tensors(step, meta, meta)


# ------------------------------------------------------------------------------------------ writing


def meshtron_to_hf(checkpoint: Union[str, Path], out_dir: Union[str, Path], dtype: Optional[torch.dtype] = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Export a meshtron checkpoint (a step_<N> directory, or a checkpoints/ directory with `latest`) as an
    HF directory: safetensors (in the saved dtype unless `dtype`), config.json, generation_config.json and
    the tokenizer and chat template stored with the checkpoint. Returns `out_dir`."""
    step = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    check_out_dir(out)
    cfg, ids = checkpoint_config(step)
    if cfg.lora.enabled:
        raise ConfigError(f"checkpoint {step} is a LoRA run's (model.lora.rank={cfg.lora.rank}): it holds the "
                          f"adapters only; use lora-to-peft for a PEFT adapter or merge-lora for a full model")
    verify_checkpoint(step, progress)
    meta = model_tensor_meta(step)
    if cfg.tie_word_embeddings and "output_layer.weight" in meta:
        raise ConfigError(f"checkpoint {step} has output_layer.weight but its config has tie_word_embeddings=true")
    if not cfg.tie_word_embeddings and "output_layer.weight" not in meta:
        raise ConfigError(f"checkpoint {step} has no output_layer.weight but its config has untied embeddings")

    with staged_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        dtypes = set()
        total = sum(s.numel() * d.itemsize for s, d in meta.values())
        with byte_progress(total, progress, f"export {step.name}") as bar:
            for names in groups(meta):
                state = read_tensors(step, meta, names)
                bar.update(sum(t.numel() * t.element_size() for t in state.values()))
                for name, t in to_hf_state_dict(state, cfg, dtype).items():
                    dtypes.add(t.dtype)
                    writer.add(name, t)
                del state
        writer.finish()
        _write_config(tmp, step, cfg, ids, dtypes)
    return out


def _write_config(tmp: Path, step: Path, cfg: ModelConfig, ids: dict, dtypes: set) -> None:
    config = hf_config(cfg, **ids)
    config.dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    hf = step / "hf"
    if hf.is_dir():  # tokenizer files, chat template, a generation config if the run had one
        for f in sorted(hf.iterdir()):
            if f.is_file() and f.name not in _MODEL_FILES and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)
    write_config_files(tmp, config)
