"""The training run: set-up in a fixed order (validate, then allocate), the step loop, evaluation, export."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

from parallel.collectives import clip_grad_norm_
from parallel.dims import ParallelDims, validate_layout
from parallel.parallelize import build_parallel_model, full_state_dict
from trainer.config import Config, ConfigError, resolved_yaml, validate_config
from trainer.distributed import RankInfo, broadcast_str, init_distributed, rank_info
from trainer.data.build import batches_in_order
from trainer.data.loader import GlobalBatchLoader
from trainer.loss import DocumentLoss, count_valid
from trainer.metrics import MetricsLogger, perplexity
from trainer.optim import build_optimizer, build_scheduler
from trainer.step import evaluate, forward_backward, global_loss, local_batch, packing_efficiency, reduce_tokens


def resolve_model(cfg: Config) -> Config:
    """With model.hf_path set, the checkpoint's config.json decides the model's shape."""
    if not cfg.model.hf_path:
        return cfg
    from checkpoint_convert.hf import read_hf_config

    hf = read_hf_config(cfg.model.hf_path, base=cfg.model)
    return dataclasses.replace(cfg, model=hf)


def prepare(cfg: Config, world_size: int) -> tuple[Config, ParallelDims]:
    """Every check that needs no allocation and no process group: config groups, cross-field rules, the
    parallel layout against model, data and batch."""
    from trainer.data.build import has_val_split

    cfg = resolve_model(cfg)
    validate_config(cfg)
    if cfg.trainer.eval_every and not has_val_split(cfg.data):
        raise ConfigError(
            f"trainer.eval_every={cfg.trainer.eval_every} needs a validation split, but data.val_path is unset "
            f"and data.val_fraction={cfg.data.val_fraction}; set one of them, or trainer.eval_every=0"
        )
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    validate_layout(cfg, dims)
    return cfg, dims


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def load_split(cfg: Config, tokenizer, split: str, info: RankInfo):
    """Rank 0 tokenizes (or finds the cache) first; the others then read its cache."""
    import torch.distributed as dist

    from trainer.data.build import build_split
    from trainer.data.pretrain import default_cache_dir

    def build():
        return build_split(cfg.data, tokenizer, split, default_cache_dir(cfg.data))

    if info.world_size == 1:
        return build()
    data = build() if info.is_main else None
    dist.barrier()
    return data if info.is_main else build()


def train(cfg: Config, info: Optional[RankInfo] = None) -> Path:
    """Train as configured on this process's share of the mesh; returns the output directory.

    `info` defaults to the launcher's environment; RankInfo(0, 1, 0) runs a single process even inside a
    distributed job (trainer.verify's reference run).
    """
    from trainer.data.tokenizer import check_vocab_fits, load_tokenizer

    info = info or rank_info()
    cfg, dims = prepare(cfg, info.world_size)
    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    device = pick_device(cfg.trainer.device, info.local_rank)

    init_distributed(info, device)
    mesh = None if dims.is_single else dims.build_mesh(device.type)
    out = Path(broadcast_str(cfg.trainer.output_dir) if info.world_size > 1 else cfg.trainer.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(resolved_yaml(cfg))

    G = cfg.trainer.global_batch_size
    train_data = load_split(cfg, tokenizer, "train", info)
    val = (batches_in_order(load_split(cfg, tokenizer, "val", info).rows, G, cfg.trainer.eval_batches,
                            "the validation split") if cfg.trainer.eval_every else [])
    loader = GlobalBatchLoader(train_data.rows, G, seed=cfg.trainer.seed)

    pm = build_parallel_model(cfg, dims, mesh, device)
    optimizer = build_optimizer(pm.parameters(), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    n_params = cfg_param_count(cfg)
    logger = MetricsLogger(cfg, out, cfg.trainer.max_steps, enabled=info.is_main)
    accum = G // (dims.dp * cfg.parallel.microbatch_size)
    logger.write(f"meshtron: {cfg.model.name} ({n_params / 1e6:.2f}M parameters) on {dims.world_size} x {device.type}, "
                 f"mesh {dims.degrees()}, {loader.rows_per_epoch} training rows of {cfg.data.seq_len} tokens, "
                 f"{G} sequences per step ({accum} micro-batches of {cfg.parallel.microbatch_size} per data rank)")
    for st in train_data.stats:
        logger.write(f"data: {st['name']}: {st['rows']} rows, packing efficiency {st['efficiency']:.1%}"
                     + (f", {st['truncated']} truncated" if st.get("truncated") else "")
                     + (f", {st['dropped']} dropped (data.overlong)" if st.get("dropped") else ""))

    tokens = 0
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    for step in range(1, cfg.trainer.max_steps + 1):
        t0 = time.perf_counter()
        batch = next(loader)
        normalizer = count_valid(batch["labels"])
        doc_loss = DocumentLoss(batch["sample_ids"], device)
        local_sum = forward_backward(pm, local_batch(batch, pm), normalizer, cfg, device, doc_loss)
        if dims.pp_enabled:  # every pp rank takes part, holder of a tied copy or not
            from parallel.pipeline import tied_embedding_grad_sync

            tied_embedding_grad_sync(pm.stages, mesh["pp"])
        grad_norm = clip_grad_norm_(pm.parameters(), max_norm, mesh, pm.duplicates)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = global_loss(local_sum, normalizer, pm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tokens += batch["input_ids"].numel()
        record = {"step": step, "loss": loss, "loss_per_doc": doc_loss.value(reduce_tokens(pm)), "lr": lr,
                  "grad_norm": float(grad_norm), "tokens": tokens,
                  "tokens_per_s": batch["input_ids"].numel() / (time.perf_counter() - t0),
                  "packing_efficiency": packing_efficiency(batch)}
        every = cfg.trainer.eval_every
        if every and (step % every == 0 or step == cfg.trainer.max_steps):
            v = evaluate(pm, val, cfg, device)
            record.update(val_loss=v, val_ppl=perplexity(v))
        if step % cfg.trainer.log_every == 0 or "val_loss" in record or step == cfg.trainer.max_steps:
            logger.log(record)

    if cfg.trainer.export_hf:
        state = full_state_dict(pm)
        if info.is_main:
            from checkpoint_convert.hf import save_hf

            ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            save_hf(state, cfg.model, out / "hf", config_overrides=ids)
            tokenizer.save_pretrained(str(out / "hf"))
    logger.write(f"done: {cfg.trainer.max_steps} steps, {tokens:,} tokens. Outputs in {out.resolve()}: "
                 "config.yaml, metrics.jsonl" + (", hf/ (safetensors model + tokenizer)" if cfg.trainer.export_hf else ""))
    logger.close()
    loader.close()
    return out


def cfg_param_count(cfg: Config) -> int:
    """Parameters of the unpadded model, from its shape alone (no rank holds all of them)."""
    m = cfg.model
    hd, q, kv = m.head_dim, m.num_attention_heads, m.num_query_groups
    attn = m.hidden_size * (q + 2 * kv) * hd + q * hd * m.hidden_size
    attn += (q + 2 * kv) * hd if m.add_qkv_bias else 0
    attn += 2 * hd if m.qk_layernorm else 0
    layer = attn + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size
    heads = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer + heads + m.hidden_size
