"""``python -m checkpoint_convert <command>`` (also ``meshtron-convert``): HF <-> Megatron-LM, meshtron -> HF,
and a numerical check of any of them. HF -> meshtron needs no command: train with ``model.hf_path=DIR``.

Exit codes: 0 done (verify: within tolerance); 1 verify found the logits differ beyond tolerance;
2 a usage error (bad flag, missing or non-empty directory, unsupported model, TP/PP that do not divide it) or
an unusable input (a damaged safetensors file or config.json), reported in one line before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from trainer.errors import ConfigError

PROG = "meshtron-convert"
EXIT_USAGE = 2

_EPILOG = """exit codes: 0 done (verify: logits within tolerance); 1 verify: logits differ beyond tolerance;
2 usage error or damaged input (one line on stderr; nothing written).

HF -> meshtron needs no conversion: train with model.hf_path=DIR at any mesh.
examples:
  %(prog)s hf-to-megatron --hf Llama-3.2-1B --out megatron-dist
  %(prog)s hf-to-megatron --hf Llama-3.2-1B --out megatron-tp2pp2 --format torch --tp 2 --pp 2
  %(prog)s hf-to-megatron --hf Qwen3-30B-A3B --out megatron-ep8 --format torch --tp 1 --pp 4 --ep 8
  %(prog)s megatron-to-hf --megatron megatron-tp2pp2 --out Llama-3.2-1B-back
  %(prog)s meshtron-to-hf --checkpoint outputs/run/checkpoints --out my-model-hf
  %(prog)s lora-to-peft --checkpoint outputs/lora-run/checkpoints --out my-adapter
  %(prog)s merge-lora --checkpoint outputs/lora-run/checkpoints --out my-model-merged
  %(prog)s verify --hf my-model-hf --checkpoint outputs/run/checkpoints
"""


class UsageError(Exception):
    """A bad command line or input: one line on stderr, exit 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(f"{message} (see {self.prog} --help)")


def _number(kind: type, minimum: float, what: str):
    """An argparse type: `kind` (int or float) of at least `minimum`, else a message naming the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    return parse


_positive = _number(int, 1, "a positive integer")
_non_negative = _number(int, 0, ">= 0")
_tolerance = _number(float, 0.0, ">= 0")


def _checkpoint_and_out(c: argparse.ArgumentParser, whose: str) -> None:
    c.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                   help=f"{whose} checkpoints/ directory (uses 'latest') or one checkpoints/step_<N> directory")
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="new (or empty) output directory")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Convert checkpoints between HF safetensors, Megatron-LM (torch_dist or "
                                       "legacy torch format) and meshtron (DCP), and verify conversions numerically.",
                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)

    c = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron-LM checkpoint (torch_dist, or legacy at "
                                              "TP x PP)",
                       description="Write a Megatron-LM checkpoint from an HF directory: torch_dist (release/ with "
                                   ".metadata, __0_0.distcp, common.pt, metadata.json; megatron-core loads it at "
                                   "any TP x PP) or the legacy torch format (release/mp_rank_TT[_PPP]/"
                                   "model_optim_rng.pt, split for one TP x PP).")
    c.add_argument("--hf", required=True, type=Path, metavar="DIR", help="HF directory (config.json + safetensors)")
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="new (or empty) output directory")
    c.add_argument("--format", choices=("torch_dist", "torch"), default="torch_dist",
                   help="Megatron-LM's --ckpt-format (default torch_dist, as Megatron-LM's)")
    c.add_argument("--tp", type=_positive, metavar="T",
                   help="tensor-parallel size (torch: required, the files' split; torch_dist: recorded in the "
                        "args and used for vocabulary padding, default 1)")
    c.add_argument("--pp", type=_positive, metavar="P",
                   help="pipeline-parallel size (torch: required; torch_dist: recorded in the args, default 1)")
    c.add_argument("--ep", type=_positive, default=1, metavar="E",
                   help="expert-parallel size of a mixture of experts (torch: files mp_rank_TT[_PPP]_EEE, EP rank k "
                        "holding experts k*E/EP..; torch_dist: recorded in the args; default 1)")
    c.add_argument("--spec", choices=("local", "te"), default="local",
                   help="megatron-core layer spec the names follow (te: Transformer Engine, fused norms; MoE experts "
                        "as TEGroupedMLP's linear_fc1.weight<e>)")
    c.add_argument("--lora", type=Path, metavar="DIR",
                   help="a PEFT LoRA adapter of this model: its weights are merged into the base as they are read")
    c.add_argument("--vocab-divisible-by", type=_positive, default=128, metavar="N",
                   help="pad the vocabulary to a multiple of N x TP, as Megatron's "
                        "--make-vocab-size-divisible-by (default 128)")

    c = sub.add_parser("megatron-to-hf", help="Megatron-LM checkpoint (torch_dist or legacy, any TP/PP) -> HF "
                                              "safetensors",
                       description="Read a Megatron-LM checkpoint saved at any TP/PP, torch_dist or legacy torch "
                                   "format (told apart by metadata.json), and write an HF directory.")
    c.add_argument("--megatron", required=True, type=Path, metavar="DIR",
                   help="Megatron checkpoint directory (with latest_checkpointed_iteration.txt)")
    c.add_argument("--out", required=True, type=Path, metavar="DIR", help="new (or empty) output directory")
    c.add_argument("--hf-config", type=Path, metavar="DIR",
                   help="HF directory whose config.json and tokenizer to use (default: rebuilt from the "
                        "checkpoint's args)")
    c.add_argument("--iteration", type=_non_negative, metavar="N",
                   help="iteration to convert (default: the one latest_checkpointed_iteration.txt names)")

    c = sub.add_parser("meshtron-to-hf", help="meshtron (DCP) checkpoint -> HF safetensors",
                       description="Export a meshtron checkpoint as an HF directory, with the tokenizer and "
                                   "chat template stored in the checkpoint. Needs nothing else.")
    _checkpoint_and_out(c, "a run's")
    c.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="cast floating-point weights (default: as saved, fp32 master weights)")

    c = sub.add_parser("lora-to-peft", help="a LoRA run's checkpoint -> PEFT adapter directory",
                       description="Write a LoRA run's adapters (a checkpoints/ or step_<N> directory) as a PEFT "
                                   "adapter: adapter_config.json + adapter_model.safetensors in PEFT's names.")
    _checkpoint_and_out(c, "a LoRA run's")

    c = sub.add_parser("merge-lora", help="a LoRA run's checkpoint -> HF model with the adapters merged in",
                       description="Merge a LoRA run's adapters into the base it trained on (its model.hf_path, or "
                                   "the base initialised from its trainer.seed) and write an HF directory with the "
                                   "run's tokenizer. Holds the base model in memory once.")
    _checkpoint_and_out(c, "a LoRA run's")
    c.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="cast the weights (default: the base's)")

    c = sub.add_parser("verify", help="compare an HF directory's logits with a Megatron or meshtron checkpoint",
                       description="Load both on CPU in fp32, run a few fixed prompts through each, print the "
                                   "max abs logit difference per prompt and overall.",
                       epilog="exit codes: 0 within tolerance; 1 above tolerance (or the models' shapes "
                              "differ); 2 usage error.")
    c.add_argument("--hf", required=True, type=Path, metavar="DIR", help="HF directory")
    other = c.add_mutually_exclusive_group(required=True)
    other.add_argument("--megatron", type=Path, metavar="DIR", help="Megatron-LM legacy checkpoint directory")
    other.add_argument("--checkpoint", type=Path, metavar="DIR", help="meshtron checkpoints/ or step_<N> directory")
    c.add_argument("--iteration", type=_non_negative, metavar="N", help="Megatron iteration (default: latest)")
    c.add_argument("--tolerance", type=_tolerance, default=1e-4, metavar="X",
                   help="largest acceptable max |logit difference| (default 1e-4, fp32)")

    for name in ("hf-to-megatron", "megatron-to-hf", "meshtron-to-hf"):
        sub.choices[name].add_argument("--no-progress", dest="progress", action="store_false",
                                       help="no progress bar on stderr")
    return p


# ------------------------------------------------------------------------------------------- checks


def _input_dir(flag: str, path: Path, what: str) -> None:
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such directory; expected {what}")
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: not a directory; expected {what}")


def _output_dir(path: Path, *inputs: Optional[Path]) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not empty; choose a new directory or remove it first")
    for src in inputs:
        if src is not None and path.resolve() == src.resolve():
            raise UsageError(f"--out {path} is the input directory; choose a new directory")


_HF = "an HF directory with config.json and *.safetensors"
_MEGATRON = "a Megatron-LM checkpoint directory with latest_checkpointed_iteration.txt (torch_dist or legacy)"
_MESHTRON = "a meshtron checkpoints/ directory or a checkpoints/step_<N> directory"


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "hf-to-megatron":
        return _hf_to_megatron(args)
    elif cmd == "megatron-to-hf":
        _input_dir("--megatron", args.megatron, _MEGATRON)
        if args.hf_config is not None:
            _input_dir("--hf-config", args.hf_config, "an HF directory with config.json")
        _output_dir(args.out, args.megatron, args.hf_config)
        if _is_torch_dist(args.megatron, args.iteration):
            from checkpoint_convert.megatron_dist_read import megatron_dist_to_hf as convert
        else:
            from checkpoint_convert.megatron import megatron_to_hf as convert

        out = convert(args.megatron, args.out, hf_config_dir=args.hf_config, iteration=args.iteration,
                      progress=args.progress)
        print(f"wrote HF checkpoint to {out}")
    elif cmd == "meshtron-to-hf":
        _input_dir("--checkpoint", args.checkpoint, _MESHTRON)
        _output_dir(args.out, args.checkpoint)
        import torch

        from checkpoint_convert.meshtron import meshtron_to_hf, resolve_checkpoint

        step = resolve_checkpoint(args.checkpoint)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
        out = meshtron_to_hf(step, args.out, dtype=dtype, progress=args.progress)
        print(f"wrote HF checkpoint of {step} to {out}")
    elif cmd in ("lora-to-peft", "merge-lora"):
        _input_dir("--checkpoint", args.checkpoint, _MESHTRON)
        _output_dir(args.out, args.checkpoint)
        if cmd == "lora-to-peft":
            from checkpoint_convert.lora import lora_to_peft

            out = lora_to_peft(args.checkpoint, args.out)
            print(f"wrote PEFT adapter to {out}")
        else:
            import torch

            from checkpoint_convert.lora import merge_lora

            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
            out = merge_lora(args.checkpoint, args.out, dtype)
            print(f"wrote merged HF checkpoint to {out}")
    elif cmd == "verify":
        _input_dir("--hf", args.hf, _HF)
        _refuse_non_hf(args.hf)
        if args.megatron is not None:
            _input_dir("--megatron", args.megatron, _MEGATRON)
        else:
            _input_dir("--checkpoint", args.checkpoint, _MESHTRON)
        from checkpoint_convert.hf import check_hf_checkpoint
        from checkpoint_convert.verify import verify

        check_hf_checkpoint(args.hf)  # transformers would fail on a damaged file with its own traceback

        return verify(args.hf, megatron=args.megatron, checkpoint=args.checkpoint, iteration=args.iteration,
                      tolerance=args.tolerance)
    return 0


def _refuse_non_hf(path: Path) -> None:
    """--hf given a Megatron or meshtron checkpoint: say what it is and which command reads it."""
    from checkpoint_convert.detect import HF, HF_CONFIG, refuse_other_kinds

    refuse_other_kinds(path, HF, HF_CONFIG)


def _hf_to_megatron(args: argparse.Namespace) -> int:
    if args.format == "torch" and (args.tp is None or args.pp is None):
        raise UsageError(f"--format torch needs --tp and --pp (missing: "
                         f"{', '.join(f for f, v in (('--tp', args.tp), ('--pp', args.pp)) if v is None)}): "
                         f"its files are split for one TP x PP")
    _input_dir("--hf", args.hf, _HF)
    _refuse_non_hf(args.hf)
    if not (args.hf / "config.json").is_file():
        raise UsageError(f"--hf {args.hf}: no config.json; expected {_HF}")
    _output_dir(args.out, args.hf)
    tp, pp = args.tp or 1, args.pp or 1
    if args.format == "torch":
        from checkpoint_convert.megatron import hf_to_megatron as convert
    else:
        from checkpoint_convert.megatron_dist_write import hf_to_megatron_dist as convert

    if args.lora is not None:
        _input_dir("--lora", args.lora, "a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    out = convert(args.hf, args.out, tp=tp, pp=pp, spec=args.spec, vocab_divisible_by=args.vocab_divisible_by,
                  progress=args.progress, ep=args.ep, lora=args.lora)
    layout = f"TP={tp}, PP={pp}" + (f", EP={args.ep}" if args.ep > 1 else "") if args.format == "torch" \
        else "loads at any TP x PP"
    print(f"wrote Megatron-LM {args.format} checkpoint ({layout}, spec {args.spec}) to {out}")
    return 0


def _is_torch_dist(path: Path, iteration: Optional[int]) -> bool:
    """Whether megatron-to-hf reads `path` as torch_dist: what checkpoint_convert.detect says of the directory
    (metadata.json), or of iter_NNNNNNN when --iteration names one."""
    from checkpoint_convert.detect import MEGATRON_TORCH_DIST, detect

    if iteration is not None and (path / f"iter_{iteration:07d}").is_dir():
        path = path / f"iter_{iteration:07d}"
    return detect(path).name == MEGATRON_TORCH_DIST


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    command = "?"
    try:
        args = parser.parse_args(argv)
        command = args.command
        return _run(args)
    except UsageError as e:
        return _fail(command if command != "?" else None, str(e))
    except (ConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # Raised by the converters for inputs they cannot use (unsupported architecture, shapes, TP/PP that
        # do not divide the model, a missing tensor): all found before the output directory is created.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return _fail(command, str(msg).splitlines()[0] if msg else type(e).__name__)


def _fail(command: Optional[str], message: str) -> int:
    print(f"{PROG}{' ' + command if command else ''}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE
