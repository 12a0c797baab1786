"""Megatron-LM's legacy (`torch` format) checkpoint files: where they are and what their `args` say.

    latest_checkpointed_iteration.txt          "release" or an iteration number
    release/ or iter_0000100/
        mp_rank_00/model_optim_rng.pt          PP = 1: mp_rank_<tp:02d>
        mp_rank_00_000/model_optim_rng.pt      PP > 1: mp_rank_<tp:02d>_<pp:03d>

The `args` namespace <-> meshtron's ModelConfig, the tracker and iteration directories, and reading one rank
file (memory-mapped, weights_only=True with argparse.Namespace allowed). Tensors and their placement over
TP x PP are `checkpoint_convert.megatron`'s business.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Optional, Union

import torch

from trainer.config import ConfigError, ModelConfig, RopeScalingConfig

PathLike = Union[str, Path]

TRACKER = "latest_checkpointed_iteration.txt"
CKPT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
TRANSFORMER_IMPL = {"local": "local", "te": "transformer_engine"}


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def megatron_args(cfg: ModelConfig, tp: int, pp: int, spec: str, padded_vocab: int, vocab_divisible_by: int,
                  dtype: torch.dtype) -> argparse.Namespace:
    """The model arguments Megatron-LM reads back (load_args_from_checkpoint, check_checkpoint_args).

    megatron-core's llama3 rope scaling hard-codes low/high frequency factors 1/4 and an original context
    of 8192; the exact values go in meshtron_rope_scaling so a round trip keeps them.
    """
    rs = cfg.rope_scaling
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=vocab_divisible_by,
        tokenizer_type="HuggingFaceTokenizer",
        normalization="RMSNorm", norm_epsilon=cfg.norm_epsilon, apply_layernorm_1p=False,
        swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm, untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=False,
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=rs is not None, rope_scaling_factor=rs.factor if rs else 8.0,
        # flash-attn / TE convention (left, right): a query sees itself and `left` earlier tokens.
        window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window else None,
        num_experts=None, init_method_std=cfg.init_std, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        transformer_impl=TRANSFORMER_IMPL[spec], use_legacy_models=False, ckpt_format="torch",
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
        meshtron_family=cfg.family, meshtron_name=cfg.name,
        meshtron_rope_scaling=dataclasses.asdict(rs) if rs else None,
    )


def config_from_args(args: argparse.Namespace, name: str = "megatron") -> ModelConfig:
    """ModelConfig from a Megatron checkpoint's args; ConfigError for architectures meshtron lacks."""
    def arg(key, default=None):
        return getattr(args, key, default)

    for key, want in (("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False),
                      ("position_embedding_type", "rope"), ("rotary_percent", 1.0), ("rotary_interleaved", False),
                      ("apply_layernorm_1p", False), ("squared_relu", False)):
        if arg(key, want) != want:
            raise ConfigError(f"Megatron checkpoint has {key}={arg(key)!r}; only {key}={want!r} is supported "
                              f"(Llama/Mistral/Qwen2/Qwen3 decoders)")
    if arg("num_experts"):
        raise ConfigError(f"Megatron checkpoint has num_experts={arg('num_experts')}; MoE is not supported")
    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = arg("num_query_groups") if arg("group_query_attention") and arg("num_query_groups") else heads
    kv = arg("kv_channels")
    window = arg("window_size")
    if window is not None and (len(window) != 2 or window[1] != 0):
        raise ConfigError(f"Megatron checkpoint has window_size={window!r}; only causal (left, 0) is supported")
    sliding = window[0] + 1 if window is not None and window[0] >= 0 else None
    fam = arg("meshtron_family") or ("qwen3" if arg("qk_layernorm") else "qwen2" if arg("add_qkv_bias")
                                     else "mistral" if sliding else "llama")
    scaling = None
    if arg("use_rope_scaling"):
        # megatron-core's defaults for what its arguments do not carry (rotary_pos_embedding._apply_scaling).
        scaling = RopeScalingConfig(**{"factor": float(arg("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       **(arg("meshtron_rope_scaling") or {})})
    cfg = ModelConfig(
        name=arg("meshtron_name") or name, family=fam,
        vocab_size=arg("vocab_size") or args.padded_vocab_size,
        hidden_size=hidden, ffn_hidden_size=args.ffn_hidden_size, num_layers=args.num_layers,
        num_attention_heads=heads, num_query_groups=groups,
        kv_channels=kv if kv and kv * heads != hidden else None,
        max_position_embeddings=arg("max_position_embeddings") or arg("seq_length"),
        rotary_base=float(arg("rotary_base", 10000)), rope_scaling=scaling,
        norm_epsilon=float(arg("norm_epsilon", 1e-5)),
        tie_word_embeddings=not arg("untie_embeddings_and_output_weights", False),
        add_qkv_bias=bool(arg("add_qkv_bias")), qk_layernorm=bool(arg("qk_layernorm")), sliding_window=sliding,
        init_std=float(arg("init_method_std", 0.02)),
        make_vocab_size_divisible_by=arg("make_vocab_size_divisible_by", 128),
    )
    cfg.validate()
    return cfg


# ======================================================================================= files


def resolve_iteration_dir(root: Path, iteration: Optional[int]) -> tuple[Path, int]:
    """(directory holding mp_rank_*, iteration number; 0 for release)."""
    if iteration is not None:
        path = root / f"iter_{iteration:07d}"
        if not path.is_dir():
            have = sorted(p.name for p in root.glob("iter_*")) + (["release"] if (root / "release").is_dir() else [])
            raise FileNotFoundError(f"{path} does not exist (iteration={iteration}); {root} has {have or 'none'}")
        return path, iteration
    tracker = root / TRACKER
    if not tracker.is_file():
        if any(root.glob("mp_rank_*")):  # the iteration directory itself
            return root, 0
        raise FileNotFoundError(f"{root} has no {TRACKER}; expected a Megatron-LM checkpoint directory "
                                f"(or pass iteration=N for its iter_NNNNNNN directory)")
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release", 0
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}; expected 'release' or an iteration number")
    return root / f"iter_{int(text):07d}", int(text)


def load_rank_file(path: Path) -> dict:
    """A rank file, memory-mapped, through the weights-only unpickler (Namespace allowed for args)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to unpickle anything but tensors and plain values "
                         f"(weights_only=True): {e}") from e


def rank_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("mp_rank_*") if re.fullmatch(r"mp_rank_\d{2}(_\d{3})?", p.name))


def first_rank_args(path: Path) -> argparse.Namespace:
    dirs = rank_dirs(path)
    if not dirs or not (dirs[0] / CKPT_FILE).is_file():
        raise FileNotFoundError(f"{path} has no mp_rank_*/{CKPT_FILE}; expected a Megatron-LM iteration directory")
    args = load_rank_file(dirs[0] / CKPT_FILE).get("args")
    if not isinstance(args, argparse.Namespace):
        raise ValueError(f"{dirs[0] / CKPT_FILE} has no args namespace; cannot tell the model's shape")
    return args


def megatron_config(megatron_dir: PathLike, iteration: Optional[int] = None) -> ModelConfig:
    """The ModelConfig a Megatron checkpoint's args describe (only the first rank file is opened)."""
    path, _ = resolve_iteration_dir(Path(megatron_dir), iteration)
    return config_from_args(first_rank_args(path), name=Path(megatron_dir).name)
