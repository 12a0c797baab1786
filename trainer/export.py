"""The HF export at the end of training, streamed: one full tensor at a time reaches global rank 0
(parallel/export.py), which converts and writes it at once (checkpoint_convert/hf.py save_hf_stream).
No rank ever holds a full copy of the model; the other ranks take part in each tensor's gather and wait
between tensors with the process groups' timeout (trainer.dist_timeout_s)."""

from __future__ import annotations

import sys
from pathlib import Path

from parallel.export import export_layout, iter_full_tensors
from trainer.config import Config


def export_hf(pm, cfg: Config, out: Path, tokenizer, is_main: bool) -> None:
    """Write `out` (safetensors, config.json, generation_config.json, tokenizer) from the trained model on
    global rank 0. Every rank calls it."""
    tensors = iter_full_tensors(pm, cfg)
    if not is_main:
        for _ in tensors:  # the collectives of each tensor; rank 0 receives
            pass
        return
    from checkpoint_convert.hf import save_hf_stream

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    save_hf_stream(tensors, export_layout(cfg, pm.dims), cfg.model, out,
                   config_overrides=ids, overwrite=True, progress=sys.stderr.isatty())
    tokenizer.save_pretrained(str(out))
