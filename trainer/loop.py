"""The training run: set-up in a fixed order (validate, then allocate), the step loop, evaluation, export."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from parallel.dims import ParallelDims
from trainer.config import Config, ConfigError, resolved_yaml, validate_config
from trainer.loss import count_valid, cross_entropy_sum
from trainer.metrics import MetricsLogger, perplexity
from trainer.optim import build_optimizer, build_scheduler


def resolve_model(cfg: Config) -> Config:
    """With model.hf_path set, the checkpoint's config.json decides the model's shape."""
    if not cfg.model.hf_path:
        return cfg
    from checkpoint_convert.hf import read_hf_config

    hf = read_hf_config(cfg.model.hf_path, base=cfg.model)
    return dataclasses.replace(cfg, model=hf)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare(cfg: Config) -> tuple[Config, ParallelDims]:
    """Every check that needs no allocation: config groups, cross-field rules, the parallel layout."""
    from trainer.data.pretrain import has_val_split

    cfg = resolve_model(cfg)
    validate_config(cfg)
    if cfg.trainer.eval_every and not has_val_split(cfg.data):
        raise ConfigError(
            f"trainer.eval_every={cfg.trainer.eval_every} needs a validation split, but data.val_path is unset "
            f"and data.val_fraction={cfg.data.val_fraction}; set one of them, or trainer.eval_every=0"
        )
    dims = ParallelDims.from_config(cfg.parallel, world_size_from_env())
    if not dims.is_single:
        raise ConfigError(
            f"world size {dims.world_size}: multi-process meshes ({dims.degrees()}) are not implemented in "
            "this version of meshtron; run with one process"
        )
    return cfg, dims


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def autocast(cfg: Config, device: torch.device):
    if cfg.trainer.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def take(it: Iterator[dict], n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def train_step(model, optimizer, scheduler, micro_batches: list[dict], cfg: Config, device) -> dict:
    """One optimizer step over all micro-batches: loss = summed CE / the step's count of valid tokens."""
    total_valid = sum(count_valid(mb["labels"]) for mb in micro_batches)
    if total_valid == 0:
        raise RuntimeError("a training step has no valid label tokens; check the data's labels")
    loss_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        with autocast(cfg, device):
            logits = model(input_ids)
        micro_loss = cross_entropy_sum(logits, labels)
        (micro_loss / total_valid).backward()
        loss_sum += micro_loss.detach()
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss_sum) / total_valid, "grad_norm": float(grad_norm), "lr": lr}


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], cfg: Config, device) -> float:
    model.eval()
    loss_sum, valid = 0.0, 0
    for mb in batches:
        labels = mb["labels"].to(device)
        with autocast(cfg, device):
            logits = model(mb["input_ids"].to(device))
        loss_sum += float(cross_entropy_sum(logits, labels))
        valid += count_valid(labels)
    model.train()
    return loss_sum / max(valid, 1)


def build_model(cfg: Config, device: torch.device):
    from trainer.model import GPTModel

    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        model = GPTModel(cfg.model)
    if cfg.model.hf_path:
        from checkpoint_convert.hf import load_hf_weights

        load_hf_weights(model, cfg.model.hf_path)
    return model


def train(cfg: Config) -> Path:
    """Train as configured; returns the output directory."""
    from trainer.data.pretrain import RowLoader, build_token_rows, default_cache_dir, iter_batches
    from trainer.data.tokenizer import check_vocab_fits, load_tokenizer

    cfg, dims = prepare(cfg)
    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    device = pick_device(cfg.trainer.device)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(resolved_yaml(cfg))

    cache = default_cache_dir(cfg.data)
    mbs = cfg.parallel.microbatch_size
    train_rows = build_token_rows(cfg.data, tokenizer, "train", cache)
    val_rows = build_token_rows(cfg.data, tokenizer, "val", cache) if cfg.trainer.eval_every else None
    loader = iter(RowLoader(train_rows, mbs, seed=cfg.trainer.seed))
    accum = cfg.trainer.global_batch_size // (mbs * dims.dp)

    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    n_params = sum(p.numel() for p in model.parameters())
    logger = MetricsLogger(cfg, out, cfg.trainer.max_steps)
    logger.write(f"meshtron: {cfg.model.name} ({n_params / 1e6:.2f}M parameters) on {device}, "
                 f"{len(train_rows)} training rows of {cfg.data.seq_len} tokens, "
                 f"{cfg.trainer.global_batch_size} sequences per step ({accum} micro-batches of {mbs})")

    tokens = 0
    for step in range(1, cfg.trainer.max_steps + 1):
        t0 = time.perf_counter()
        micro_batches = take(loader, accum)
        record = train_step(model, optimizer, scheduler, micro_batches, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches)
        tokens += step_tokens
        record = {"step": step, **record, "tokens": tokens,
                  "tokens_per_s": step_tokens / (time.perf_counter() - t0)}
        every = cfg.trainer.eval_every
        if every and (step % every == 0 or step == cfg.trainer.max_steps):
            val = evaluate(model, iter_batches(val_rows, mbs, cfg.trainer.eval_batches), cfg, device)
            record.update(val_loss=val, val_ppl=perplexity(val))
        if step % cfg.trainer.log_every == 0 or "val_loss" in record or step == cfg.trainer.max_steps:
            logger.log(record)
    export_dir = out / "hf"
    if cfg.trainer.export_hf:
        from checkpoint_convert.hf import save_hf

        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        save_hf(model, cfg.model, export_dir, config_overrides=ids)
        tokenizer.save_pretrained(str(export_dir))
    logger.write(f"done: {cfg.trainer.max_steps} steps, {tokens:,} tokens. Outputs in {out.resolve()}: "
                 "config.yaml, metrics.jsonl" + (", hf/ (safetensors model + tokenizer)" if cfg.trainer.export_hf else ""))
    logger.close()
    return out
