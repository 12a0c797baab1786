"""The HF export at the end of training, streamed: one full tensor at a time reaches global rank 0
(parallel/export.py), which converts and writes it at once (checkpoint_convert/hf.py save_hf_stream).
No rank ever holds a full copy of the model; the other ranks take part in each tensor's gather and wait
between tensors with the process groups' timeout (trainer.dist_timeout_s).

A full disk (trainer/disk.py): the export's exact size is checked against the free space before anything is
written; a write that fails anyway leaves no partial directory (save_hf_stream writes under a hidden name), rank
0 still takes part in every remaining gather, and every rank ends with the same RunExit (exit 5) naming where
the trained weights are: the checkpoint of the final step, when there is one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from parallel.export import export_layout, iter_full_tensors
from trainer.config import Config
from trainer.disk import NoSpace, check_space, is_no_space
from trainer.exits import EXIT_NO_SPACE, RunExit

# Beside the weights: config.json, generation_config.json and the tokenizer; a larger tokenizer (Llama 3's
# tokenizer.json is 9 MB) that does not fit after all fails the write, which is handled as well.
SMALL_FILES_BYTES = 1 << 20
_ADVICE = "free space there or set trainer.output_dir on a larger filesystem"


def export_bytes(cfg: Config, dims) -> int:
    """Bytes the export writes: its safetensors exactly (the HF layout at the saved dtype), plus room for the
    config and tokenizer files."""
    from checkpoint_convert.hf import hf_layout

    plan = hf_layout(export_layout(cfg, dims), cfg.model)
    return sum(shape.numel() * dtype.itemsize for shape, dtype in plan.values()) + SMALL_FILES_BYTES


def export_hf(pm, cfg: Config, out: Path, tokenizer, is_main: bool, saved: Optional[Path] = None,
              adapters: Optional[dict] = None) -> None:
    """Write `out` (safetensors, config.json, generation_config.json, tokenizer) from the trained model on
    global rank 0. Every rank calls it. `saved`: the complete checkpoint of the final step, if any, named when
    the export fails for want of space (RunExit EXIT_NO_SPACE on every rank)."""
    distributed = pm.mesh is not None
    problem = ""
    if is_main:
        try:
            check_space("the HF export", out, export_bytes(cfg, pm.dims), _ADVICE)
        except NoSpace as e:
            problem = str(e)
    if distributed:
        problem = _from_rank0(problem)
    if not problem:
        problem = _write(pm, cfg, out, tokenizer, is_main, adapters)
        if distributed:
            problem = _from_rank0(problem)
    if problem:
        raise RunExit(EXIT_NO_SPACE, problem + "; " + _where_the_weights_are(saved, out))


def _write(pm, cfg: Config, out: Path, tokenizer, is_main: bool, adapters: Optional[dict] = None) -> str:
    """'' when written, else why (no space); rank 0 keeps taking part in the gathers after a failed write.
    `adapters` (rank 0: LoRA's full adapters): merged into their base weights on the way (the merged model)."""
    tensors = iter_full_tensors(pm, cfg)
    if is_main and adapters:
        from trainer.lora import merge_weight

        base = tensors
        tensors = ((n, merge_weight(n, t, adapters, cfg.model.lora, cfg.model)) for n, t in base)
    if not is_main:
        for _ in tensors:  # the collectives of each tensor; rank 0 receives
            pass
        return ""
    from checkpoint_convert.hf import save_hf_stream

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    try:
        save_hf_stream(tensors, export_layout(cfg, pm.dims), cfg.model, out,
                       config_overrides=ids, overwrite=True, progress=sys.stderr.isatty(),
                       extra_files=lambda d: tokenizer.save_pretrained(str(d)))
    except OSError as e:
        if not is_no_space(e):
            raise
        for _ in tensors:  # the other ranks are still sending: finish every gather with them
            pass
        return str(NoSpace("the HF export", out, export_bytes(cfg, pm.dims),
                           f"its partial files were removed; {_ADVICE}"))
    return ""


def export_adapter(pm, cfg: Config, out: Path, is_main: bool) -> Optional[dict]:
    """A LoRA run's trained adapters as a PEFT adapter directory (trainer/lora.py save_peft_adapter), gathered
    one tensor at a time to global rank 0 like the model export. Every rank calls it; rank 0 gets the adapters
    (full tensors, small) back for a merged export."""
    from parallel.export import adapter_layout

    tensors = iter_full_tensors(pm, cfg, adapter_layout(cfg, pm.dims))
    if not is_main:
        for _ in tensors:
            pass
        return None
    from trainer.lora import save_peft_adapter

    adapters = dict(tensors)
    save_peft_adapter(adapters, cfg.model.lora, cfg.model.hf_path, out, moe=cfg.model.moe.enabled)
    return adapters


def _from_rank0(problem: str) -> str:
    from trainer.distributed import broadcast_str

    return broadcast_str(problem)


def _where_the_weights_are(saved: Optional[Path], out: Path) -> str:
    if saved is not None:
        return (f"the trained weights are safe in the checkpoint {saved}: once there is space, export it with "
                f"meshtron-convert meshtron-to-hf --checkpoint {saved} --out {out}")
    return ("no checkpoint of the final step exists (trainer.checkpoint.save_before_export=false, or it did not "
            "fit either): the trained weights are lost")
