"""Megatron-LM's legacy (`torch` format) checkpoint files: where they are, what their `args` say, and reading them.

    latest_checkpointed_iteration.txt          "release" or an iteration number
    hf/                                        tokenizer, generation config (written by hf-to-megatron; read by
                                               megatron-to-hf for the special tokens: megatron_tokenizer)
    release/ or iter_0000100/
        mp_rank_00/model_optim_rng.pt          PP = 1: mp_rank_<tp:02d>
        mp_rank_00_000/model_optim_rng.pt      PP > 1: mp_rank_<tp:02d>_<pp:03d>
        mp_rank_00[_000]_001/...               EP > 1 (experts): _<ep:03d> appended (checkpoint_convert.megatron_moe)

Each rank file is what Megatron-LM's save_checkpoint writes (megatron/training/checkpointing.py,
generate_state_dict): {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration", "model" (or "model0",
"model1", ... one per virtual pipeline stage), "optimizer", "opt_param_scheduler", "rng_state" (numpy arrays
among them), "num_floating_point_operations_so_far", ...}. Only args, iteration, checkpoint_version and the
model entries are kept. The args namespace <-> meshtron's ModelConfig and the real vocabulary size are here;
tensors and their placement over TP x PP are `checkpoint_convert.megatron`'s business.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import signal
import types
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import torch

from checkpoint_convert.megatron_moe import moe_args, moe_family, moe_from_args
from trainer.config import ModelConfig, RopeScalingConfig
from trainer.errors import ConfigError, DamagedFileError

PathLike = Union[str, Path]

TRACKER = "latest_checkpointed_iteration.txt"
CKPT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
TRANSFORMER_IMPL = {"local": "local", "te": "transformer_engine"}


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    base = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return base if ep == 1 else f"{base}_{ep_rank:03d}"


def megatron_args(cfg: ModelConfig, tp: int, pp: int, spec: str, padded_vocab: int, vocab_divisible_by: int,
                  dtype: torch.dtype, ep: int = 1) -> argparse.Namespace:
    """The model arguments Megatron-LM reads back (load_args_from_checkpoint, check_checkpoint_args).

    megatron-core's llama3 rope scaling hard-codes low/high frequency factors 1/4 and an original context
    of 8192; the exact values go in meshtron_rope_scaling so a round trip keeps them.
    """
    rs = cfg.rope_scaling
    args = argparse.Namespace(
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
    vars(args).update(moe_args(cfg, tp, ep, spec))  # nothing for a dense model: its args are as they were
    return args


def config_from_args(args: argparse.Namespace, name: str = "megatron") -> ModelConfig:
    """ModelConfig from a Megatron checkpoint's args; ConfigError for architectures meshtron lacks.

    vocab_size is the real vocabulary when the args imply it (:func:`vocab_from_args`), else every padded row.
    """
    def arg(key, default=None):
        return getattr(args, key, default)

    for key, want in (("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False),
                      ("position_embedding_type", "rope"), ("rotary_percent", 1.0), ("rotary_interleaved", False),
                      ("apply_layernorm_1p", False), ("squared_relu", False)):
        if arg(key, want) != want:
            raise ConfigError(f"Megatron checkpoint has {key}={arg(key)!r}; only {key}={want!r} is supported "
                              f"(Llama/Mistral/Qwen2/Qwen3 decoders)")
    moe = moe_from_args(args, args.num_layers)
    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = arg("num_query_groups") if arg("group_query_attention") and arg("num_query_groups") else heads
    kv = arg("kv_channels")
    window = arg("window_size")
    if window is not None and (len(window) != 2 or window[1] != 0):
        raise ConfigError(f"Megatron checkpoint has window_size={window!r}; only causal (left, 0) is supported")
    sliding = window[0] + 1 if window is not None and window[0] >= 0 else None
    fam = arg("meshtron_family") or (moe_family(args, moe) if moe.enabled else "qwen3" if arg("qk_layernorm")
                                     else "qwen2" if arg("add_qkv_bias") else "mistral" if sliding else "llama")
    scaling = None
    if arg("use_rope_scaling"):
        # megatron-core's defaults for what its arguments do not carry (rotary_pos_embedding._apply_scaling).
        scaling = RopeScalingConfig(**{"factor": float(arg("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       **(arg("meshtron_rope_scaling") or {})})
    cfg = ModelConfig(
        name=arg("meshtron_name") or name, family=fam,
        vocab_size=vocab_from_args(args)[0] or args.padded_vocab_size,
        hidden_size=hidden, ffn_hidden_size=args.ffn_hidden_size, num_layers=args.num_layers,
        num_attention_heads=heads, num_query_groups=groups,
        kv_channels=kv if kv and kv * heads != hidden else None,
        max_position_embeddings=arg("max_position_embeddings") or arg("seq_length"),
        rotary_base=float(arg("rotary_base", 10000)), rope_scaling=scaling,
        norm_epsilon=float(arg("norm_epsilon", 1e-5)),
        tie_word_embeddings=not arg("untie_embeddings_and_output_weights", False),
        add_qkv_bias=bool(arg("add_qkv_bias")), qk_layernorm=bool(arg("qk_layernorm")), sliding_window=sliding,
        init_std=float(arg("init_method_std", 0.02)),
        make_vocab_size_divisible_by=arg("make_vocab_size_divisible_by", 128), moe=moe,
    )
    cfg.validate()
    return cfg


# Megatron-LM's tokenizers (megatron/training/tokenizer/tokenizer.py, megatron/core/tokenizers/) and what the
# args say about the real vocabulary: NullTokenizer and NullMultimodalTokenizer report vocab_size + 1 (the EOD
# token is id vocab_size); TikTokenizer reports vocab_size (2**17 when unset); every other tokenizer reads its
# size from the files args only name (args.vocab_size is unused by them). Megatron then pads the embedding to
# padded_vocab_size = ceil(size / (make_vocab_size_divisible_by x TP)) x that, trained rows and padding alike.
NULL_TOKENIZERS = ("NullTokenizer", "NullMultimodalTokenizer")
TIKTOKEN_DEFAULT_VOCAB = 2**17


def vocab_from_args(args: argparse.Namespace) -> tuple[Optional[int], str]:
    """(the real vocabulary size, why) as a checkpoint's args imply it; (None, why not) when only the
    tokenizer's own files know it."""
    tok, size = getattr(args, "tokenizer_type", None), getattr(args, "vocab_size", None)
    if getattr(args, "meshtron_family", None) and size:  # written by hf_to_megatron, from the HF config
        return size, f"vocab_size={size} that meshtron's hf-to-megatron recorded from the HF config"
    if tok in NULL_TOKENIZERS and size is not None:
        return size + 1, f"tokenizer_type={tok}: vocab_size={size} + 1 EOD token"
    if tok == "TikTokenizer":
        default = "" if size else f" (unset: TikTokenizer's default {TIKTOKEN_DEFAULT_VOCAB})"
        return (size or TIKTOKEN_DEFAULT_VOCAB), f"tokenizer_type=TikTokenizer: vocab_size={size}{default}"
    return None, f"tokenizer_type={tok!r} keeps the vocabulary size in its tokenizer files, not in the args"


def vocab_note(args: argparse.Namespace, rows: int, padded: int, hf_config_dir: Optional[PathLike] = None) -> str:
    """One line: how many of the checkpoint's `padded` vocabulary rows are kept (`rows`), and why.

    Without an HF config and with a tokenizer whose size the args do not record (GPT2BPE, HuggingFace,
    SentencePiece, ...), every row is kept, padding included, with a warning rather than a refusal: that is the
    model Megatron-LM itself runs (its output layer scores padded_vocab_size tokens), nothing is lost, and HF
    models whose embedding is larger than their tokenizer are common (Qwen2: 151936 rows, 151665 tokens). A
    Megatron-Bridge export always starts from an HF config and trims to its vocab_size; --hf-config does so.
    """
    if hf_config_dir is not None:
        return f"vocabulary: {rows} of the checkpoint's {padded} rows (vocab_size of {hf_config_dir}/config.json)"
    size, why = vocab_from_args(args)
    if size is not None:
        return f"vocabulary: {rows} of the checkpoint's {padded} rows ({why})"
    return (f"warning: vocabulary: keeping all {padded} rows, padding included: {why}; pass --hf-config DIR (the "
            f"model's HF config.json, whose vocab_size is the tokenizer's) to drop the padding rows")


# ======================================================================================= files


def resolve_iteration_dir(root: Path, iteration: Optional[int]) -> tuple[Path, int]:
    """(directory holding mp_rank_*, iteration number; 0 for release)."""
    if iteration is not None:
        path = root / f"iter_{iteration:07d}"
        if not path.is_dir():
            have = sorted(p.name for p in root.glob("iter_*")) + (["release"] if (root / "release").is_dir() else [])
            raise FileNotFoundError(f"{path} does not exist (--iteration {iteration}); {root} has {have or 'none'}")
        return path, iteration
    tracker = root / TRACKER
    if not tracker.is_file():
        if any(root.glob("mp_rank_*")):  # the iteration directory itself
            return root, 0
        raise FileNotFoundError(f"{root} has no {TRACKER}; expected a Megatron-LM checkpoint directory "
                                f"(or pass --iteration N for its iter_NNNNNNN directory)")
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release", 0
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}; expected 'release' or an iteration number")
    return root / f"iter_{int(text):07d}", int(text)


# ======================================================================================= unpickling
#
# torch.load(weights_only=True) walks the whole pickle: to reach "model" it must rebuild every object of the
# file, optimizer and rng state included, so every global a Megatron-LM file may hold has to be allowed. This
# is exactly the list Megatron-LM allows when it loads its own files (megatron/core/safe_globals.py,
# SAFE_GLOBALS; 0.12 and 0.13 loaded with weights_only=False, their files hold AttnBackend and ModelType in
# args and numpy arrays in rng_state), spelled as pickles name them (defining module + qualified name):
#   core 0.14, 0.15   SimpleNamespace, PosixPath, numpy _reconstruct/ndarray/dtype/UInt32DType, Namespace,
#                     AttnBackend, ModelType, RerunDiagnostic, RerunMode, RerunState
#   core 0.16, 0.17   + CudaGraphScope, OptimizerConfig, io.BytesIO, signal.Signals
#   core 0.18, 0.19   + CudaGraphModule, InferenceCudaGraphScope, torch._C.Generator
# Namespace (args) and SimpleNamespace are rebuilt as themselves, PosixPath as a PurePosixPath; everything
# else becomes an inert stand-in whether or not megatron, numpy or a GPU is here: nothing the converter reads
# depends on it, and no library code runs on the file's bytes.


class _StandIn:
    """An allowed global the converter never needs: keeps the arguments (REDUCE, NEWOBJ) and the state (BUILD)
    the pickle hands it, and does nothing else."""

    qualified = ""

    def __new__(cls, *args):
        self = object.__new__(cls)
        self.args = args
        return self

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualified}{self.args!r}>"


class _EnumStandIn(_StandIn):
    """An Enum member (pickled as `Class(value)`): keeps .value, and .name where the value's name is known."""

    names: dict = {}

    def __new__(cls, value):
        self = super().__new__(cls, value)
        self.value, self.name = value, cls.names.get(value)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name if self.name else repr(self.value)}"


def _stand_in(qualified: str, names: Optional[dict] = None) -> tuple[type, str]:
    base = _StandIn if names is None else _EnumStandIn
    cls = type(qualified.rsplit(".", 1)[1], (base,), {"qualified": qualified, "names": names or {}})
    return cls, qualified


def _enum(*names: str) -> dict:
    return dict(enumerate(names, start=1))  # Megatron's enums number their members from 1


_CORE, _ENUMS = "megatron.core.", "megatron.core.transformer.enums."
SAFE_GLOBALS: list[tuple[object, str]] = [
    (argparse.Namespace, "argparse.Namespace"),
    (types.SimpleNamespace, "types.SimpleNamespace"),
    (PurePosixPath, "pathlib.PosixPath"),  # pure: builds on any OS, touches no file system
    (PurePosixPath, "pathlib._local.PosixPath"),  # the same class, pickled by Python >= 3.13
    _stand_in("_io.BytesIO"),  # TE's _extra_state
    _stand_in("signal.Signals", {s.value: s.name for s in signal.Signals}),  # names as numbered here
    *(_stand_in(f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")),  # numpy 1.x, 2.x
    _stand_in("numpy.ndarray"), _stand_in("numpy.dtype"), _stand_in("numpy.dtypes.UInt32DType"),
    _stand_in("torch._C.Generator"),  # rebuilding a CUDA generator would need a GPU
    _stand_in(_ENUMS + "AttnBackend", _enum("flash", "fused", "unfused", "local", "auto")),
    _stand_in(_ENUMS + "CudaGraphScope", _enum("full_iteration", "attn", "mlp", "moe", "moe_router",
                                               "moe_preprocess", "mamba", "full_iteration_inference")),
    _stand_in(_ENUMS + "CudaGraphModule", _enum("attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba")),
    _stand_in(_ENUMS + "InferenceCudaGraphScope", _enum("none", "layer", "block")),
    _stand_in(_CORE + "enums.ModelType", _enum("encoder_or_decoder")),  # 2 and 3 were renamed in 0.14
    _stand_in(_CORE + "optimizer.optimizer_config.OptimizerConfig"),
    _stand_in(_CORE + "rerun_state_machine.RerunDiagnostic",
              {"correct_result": "CORRECT_RESULT", "transient_error": "TRANSIENT_ERROR",
               "persistent_error": "PERSISTENT_ERROR"}),
    _stand_in(_CORE + "rerun_state_machine.RerunMode",
              {"disabled": "DISABLED", "validate_results": "VALIDATE_RESULTS",
               "report_determinism_stats": "REPORT_DETERMINISM_STATS"}),
    _stand_in(_CORE + "rerun_state_machine.RerunState",
              {0: "NOT_RUNNING_YET", 1: "INITIAL_RUN", 2: "RERUNNING_IN_PLACE", 3: "WILL_RERUN_FROM_CHECKPOINT",
               4: "RERUNNING_FROM_CHECKPOINT", 5: "RERUNNING_AGAIN_FROM_CHECKPOINT"}),
]
ALLOWED_NAMES = frozenset(name for _, name in SAFE_GLOBALS)
_KEEP = ("args", "iteration", "checkpoint_version")
MODEL_KEY = re.compile(r"model\d*")  # "model", or "model0", "model1", ... with virtual pipeline stages


def load_rank_file(path: Path) -> dict:
    """args, iteration, checkpoint_version and the model entries of one rank file, tensors memory-mapped.

    torch.load(weights_only=True) with Megatron-LM's own allow-list (above) for this load only, so
    nothing in the file can run code; a global outside it -> ConfigError naming it; a file that is not a
    readable torch.save zip (truncated, empty, a Git LFS pointer) -> DamagedFileError."""
    with megatron_safe_globals():
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(refusal_message(path, str(e))) from None
        except RuntimeError as e:
            raise _damaged(path, str(e)) from None
    if not isinstance(state, dict):
        raise DamagedFileError(path, f"holds a {type(state).__name__}, not Megatron-LM's checkpoint dict",
                               "expected a model_optim_rng.pt written by Megatron-LM's save_checkpoint")
    return {k: v for k, v in state.items() if k in _KEEP or MODEL_KEY.fullmatch(k)}


@contextmanager
def megatron_safe_globals():
    """SAFE_GLOBALS allowed for the loads inside this context: use it, not torch's safe_globals, for them.

    torch keeps one process-wide set, looked up by name, and importing megatron.core adds Megatron's real
    classes under the same names (megatron/core/__init__.py calls register_safe_globals): which of two entries
    of one name wins would be arbitrary (numpy's real ndarray meeting a stand-in _reconstruct fails), so
    entries of these names are set aside inside and everything registered before is restored after."""
    before = torch.serialization.get_safe_globals()
    others = [g for g in before if (g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
              not in ALLOWED_NAMES]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(others + SAFE_GLOBALS)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def refusal_message(source, error: str, where: Optional[str] = None) -> str:
    """One line naming the global(s) torch refused in `source` (a torch.save file: path or file object); call
    it inside :func:`megatron_safe_globals`. `where` names the source in the message (default: the path)."""
    where = where or str(source)
    named = re.findall(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", error)
    try:  # a static scan of the pickle (nothing rebuilt): every other global still blocked, not only the first
        if hasattr(source, "seek"):
            source.seek(0)
        blocked = sorted(set(named) | set(torch.serialization.get_unsafe_globals_in_checkpoint(source)))
    except (RuntimeError, ValueError, OSError):
        blocked = named
    if not blocked:  # an allowed global used in a way weights_only forbids: torch's own words
        lines = [ln.strip().removeprefix("WeightsUnpickler error: ") for ln in error.splitlines()]
        why = " ".join(ln for ln in lines if ln and not ln.startswith(("Weights only load failed", "(1)", "(2)",
                                                                        "Check the documentation")))
        return f"{where}: refusing to unpickle it (weights_only=True): {why}"
    return (f"{where}: refusing to unpickle {', '.join(blocked)}: not among the types Megatron-LM itself allows "
            f"in its checkpoints (megatron/core/safe_globals.py), and unpickling it could run code from the file "
            f"(nothing was run); if the file comes from a Megatron-LM you trust, load it there and save the model "
            f"without that object, else do not use it")


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_ZIP = b"PK\x03\x04"


def _damaged(path: Path, error: str) -> DamagedFileError:
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    size = path.stat().st_size
    if head == _LFS_POINTER:
        return DamagedFileError(path, "is a Git LFS pointer, not the checkpoint",
                                "run `git lfs pull` in the repository holding it (or copy the files again)")
    if size and not head.startswith(_ZIP):
        return DamagedFileError(path, f"is not a torch.save zip archive ({size} bytes)",
                                "expected Megatron-LM's model_optim_rng.pt; copy it again, or re-save it with "
                                "torch.save from a torch >= 1.6 if it predates the zip format")
    first = error.splitlines()[0] if error else "unreadable"
    return DamagedFileError(path, f"is truncated or corrupt ({size} bytes: {first})",
                            "copy it again from where Megatron-LM wrote it")


def rank_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("mp_rank_*") if re.fullmatch(r"mp_rank_\d{2}(_\d{3}){0,2}", p.name))


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
