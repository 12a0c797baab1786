"""The training run: set-up in a fixed order (validate, then allocate), the step loop, evaluation, export."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from parallel.collectives import clip_grad_norm_
from parallel.dims import ParallelDims, validate_layout
from parallel.float8 import check_fp8, precompute_fsdp_scales
from trainer.lora import check_lora
from parallel.parallelize import ParallelModel, build_parallel_model
from trainer.config import Config, TrainerConfig, device_type, validate_config
from trainer.config_io import resolved_yaml
from trainer.errors import ConfigError
from trainer.distributed import RankInfo, broadcast_str, init_distributed, rank_info
from trainer.data.build import batches_in_order
from trainer.dpo_run import DpoObjective, build_dpo, check_dpo
from trainer.data.loader import GlobalBatchLoader
from trainer.flops import moe_layer_params
from trainer.loss import DocumentLoss
from trainer.metrics import MetricsLogger, StepMeter, perplexity, without_missing_wandb
from trainer.checkpoint import Checkpointer, find_resume
from trainer.disk import NoSpace, is_no_space, write_text_atomic
from trainer.exits import EXIT_CHECKPOINT_FAILED, EXIT_NO_SPACE, EXIT_NONFINITE, RunExit, resume_hint
from trainer.optim import StageOptimizers
from trainer.signals import PreemptionSignals
from trainer.step import batch_facts, cp_group, evaluate, forward_backward, local_batch, step_totals


def resolve_model(cfg: Config) -> Config:
    """With model.hf_path set, the checkpoint's config.json decides the model's shape."""
    if not cfg.model.hf_path:
        return cfg
    from checkpoint_convert.hf import read_hf_config

    hf = read_hf_config(cfg.model.hf_path, base=cfg.model)
    return dataclasses.replace(cfg, model=hf)


def hf_weight_loader(cfg: Config):
    """With model.hf_path set, what fills each stage from the HF checkpoint (only the slices it holds)."""
    if not cfg.model.hf_path:
        return None
    from checkpoint_convert.hf import load_hf_weights

    return lambda module, partial: load_hf_weights(module, cfg.model.hf_path, partial=partial)


def prepare(cfg: Config, world_size: int) -> tuple[Config, ParallelDims]:
    """Every check that needs no allocation and no process group: config groups, cross-field rules, the
    parallel layout against model, data and batch."""
    from trainer.data.build import has_val_split

    cfg = resolve_model(cfg)
    validate_config(cfg)
    check_dpo(cfg)
    if cfg.trainer.eval_every and not has_val_split(cfg.data):
        raise ConfigError(
            f"trainer.eval_every={cfg.trainer.eval_every} needs a validation split, but data.val_path is unset "
            f"and data.val_fraction={cfg.data.val_fraction}; set one of them, or trainer.eval_every=0"
        )
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    validate_layout(cfg, dims)
    from checkpoint_convert.hf import hf_config

    hf_config(cfg.model)  # the config.json every checkpoint and the export write: refused now, not at a save
    return cfg, dims


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    name = device_type(name)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name != "cuda":
        return torch.device("cpu")
    # One visible GPU per process (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) is index 0
    # whatever the local rank; otherwise local rank i takes GPU i.
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} but only {count} CUDA devices are visible to it: start one "
                          f"process per GPU (torchrun --nproc_per_node {count}, or srun --ntasks-per-node {count})")
    return torch.device("cuda", local_rank)


def load_split(cfg: Config, tokenizer, split: str, info: RankInfo):
    """Every rank builds the split; a missing token cache is tokenized by all ranks together, each its part
    of the files, and merged by rank 0 (trainer.data.shared: file-system waits bounded by
    trainer.dist_timeout_s, no barrier)."""
    import uuid

    from trainer.data.build import build_split
    from trainer.data.pretrain import default_cache_dir
    from trainer.data.shared import Share

    # One id per attempt, so error markers left by a crashed earlier attempt are not taken for this one's.
    run_id = broadcast_str(uuid.uuid4().hex) if info.world_size > 1 else ""
    share = Share(info.rank, info.world_size, cfg.trainer.dist_timeout_s, run_id)
    return build_split(cfg.data, tokenizer, split, default_cache_dir(cfg.data), share=share)


def train(cfg: Config, info: Optional[RankInfo] = None) -> Path:
    """Train as configured on this process's share of the mesh; returns the output directory.

    `info` defaults to the launcher's environment; RankInfo(0, 1, 0) runs a single process even inside a
    distributed job (trainer.verify's reference run).
    """
    from trainer.data.tokenizer import check_vocab_fits, load_tokenizer
    from trainer.model.attention import check_attention_backend
    from trainer.host_memory import return_freed_memory
    from trainer.startup import StartupClock

    info = info or rank_info()
    clock = StartupClock()
    return_freed_memory()  # before anything large is allocated (trainer/host_memory.py)
    cfg, dims = prepare(cfg, info.world_size)
    cfg = without_missing_wandb(cfg, info.is_main)
    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    device = pick_device(cfg.trainer.device, info.local_rank)
    check_attention_backend(cfg.model, device.type, dims.cp_enabled)  # before anything is allocated
    check_fp8(cfg, dims.tp, device)
    check_lora(cfg, dims)

    init_distributed(info, device, cfg.trainer.dist_timeout_s)
    mesh = None if dims.is_single else dims.build_mesh(device.type, cfg.trainer.dist_timeout_s)
    out = Path(broadcast_str(cfg.trainer.output_dir) if info.world_size > 1 else cfg.trainer.output_dir)

    G = cfg.trainer.global_batch_size
    clock.mark("import")  # and set-up: config checks, tokenizer, process group, mesh
    train_data = load_split(cfg, tokenizer, "train", info)
    val_rows = load_split(cfg, tokenizer, "val", info).rows if cfg.trainer.eval_every else None
    val = batches_in_order(val_rows, G, cfg.trainer.eval_batches, "the validation split") if val_rows else []
    loader = GlobalBatchLoader(train_data.rows, G, seed=cfg.trainer.seed, pin_memory=device.type == "cuda")
    clock.mark("data index")

    pm = build_parallel_model(cfg, dims, mesh, device, hf_weight_loader(cfg))
    opt = StageOptimizers(pm.modules, cfg.optim, device, cfg.trainer.max_steps)
    ckpt = Checkpointer(cfg, out, info.rank, info.world_size, tokenizer)
    clock.mark("model init")
    clock.move(pm.weights_s, "model init", "weights")  # initial or HF weights, filled inside the build
    candidates, notes = find_resume(cfg, out)
    if info.world_size > 1:  # every rank considers the checkpoints rank 0 found
        candidates = [Path(p) for p in json.loads(broadcast_str(json.dumps([str(p) for p in candidates])))]
    resume, more = ckpt.pick(candidates)
    notes += more
    # Before a checkpoint is loaded: a precomputed reference is made with the initial weights.
    dpo = build_dpo(cfg, pm, train_data.rows, val_rows, device, info.is_main, None if resume is None else str(resume),
                    lambda: build_parallel_model(cfg, dims, mesh, device, hf_weight_loader(cfg)))
    start, tokens = 0, 0
    if resume is not None:
        start, tokens, more = ckpt.load(resume, pm, opt, loader)
        notes += more + [f"checkpoint: resumed from {resume} at step {start}"]
        if info.is_main:
            truncate_metrics(out / "metrics.jsonl", start)
    clock.mark("weights")
    # Only now: a data, weights or checkpoint error above leaves no output directory behind.
    problem = write_run_config(out, cfg) if info.is_main else ""
    if info.world_size > 1:
        problem = broadcast_str(problem)
    if problem:
        loader.close()
        raise RunExit(EXIT_NO_SPACE, problem)
    n_params = cfg_param_count(cfg)
    logger = MetricsLogger(cfg, out, cfg.trainer.max_steps, start_step=start, enabled=info.is_main)
    accum = dims.microbatches_per_step(G, cfg.parallel.microbatch_size)
    if cfg.model.lora.enabled:
        from trainer.lora import trainable_count

        trainable = trainable_count(cfg.model, cfg.model.lora)
        size = (f"{n_params / 1e6:.2f}M parameters, LoRA rank {cfg.model.lora.rank}: trainable "
                f"{_count(trainable)} of {_count(n_params + trainable)}, {100 * trainable / (n_params + trainable):.2f}%")
    else:
        size = f"{n_params / 1e6:.2f}M parameters"
    logger.write(f"meshtron: {cfg.model.name} ({size}) on {dims.world_size} x {device.type}, "
                 f"mesh {dims.degrees()}, {loader.rows_per_epoch} training rows of {cfg.data.seq_len} tokens, "
                 f"{G} sequences per step ({accum} micro-batches of {cfg.parallel.microbatch_size} per data rank)")
    if cfg.trainer.precision == "fp8":
        from parallel.float8 import emulated

        logger.write(f"fp8: {pm.fp8_layers} linear layers in fp8 on rank 0 (trainer.fp8.recipe={cfg.trainer.fp8.recipe}, "
                     + ("emulated: fp8 numerics, high-precision matmuls" if emulated(cfg.trainer.fp8, device.type)
                        else "fp8 GEMMs") + "); embeddings, norms, attention, MoE routers and the output layer in bf16")
    if dpo is not None:
        d = cfg.dpo
        logger.write(f"objective: dpo, loss_type {d.loss_type}, beta {d.beta}, reference {d.reference}"
                     + (f", sft_weight {d.sft_weight}" if d.sft_weight else "")
                     + f"; the loss is the mean over each step's pairs ({G} rows a step, pairs packed whole)")
    for st in train_data.stats:
        logger.write(f"data: {st['name']}: {st['rows']} rows, packing efficiency {st['efficiency']:.1%}"
                     + (f", {st['truncated']} truncated" if st.get("truncated") else "")
                     + (f", {st['dropped']} dropped (data.overlong)" if st.get("dropped") else "")
                     + (", documents end with EOS in the files (--append-eod): none appended" if st.get("eod") else ""))
    for note in notes:
        logger.write(note)
    logger.write(clock.line())

    signals, own_signals = PreemptionSignals.for_run()
    try:
        stop_if_signalled_before_the_steps(signals, info, device, start, out)
        _run_steps(Run(cfg, info, device, pm, opt, ckpt, loader, logger, val, signals, dpo), start, tokens)
    except RunExit as stop:
        if stop.code != EXIT_CHECKPOINT_FAILED:
            ckpt.wait()  # an earlier async save holds good state: commit it before exiting
        raise
    else:
        ckpt.close()
    finally:
        if own_signals:
            signals.restore()
        logger.close()
        loader.close()

    if cfg.trainer.export_hf and cfg.model.lora.enabled:
        from trainer.export import export_adapter, export_hf

        # What a LoRA run trained: the adapters, loadable with peft.PeftModel.from_pretrained(base, DIR).
        adapters = export_adapter(pm, cfg, out / "hf_adapter", info.is_main)
        if cfg.trainer.export_merged:  # and the base with them merged in: a plain HF model
            export_hf(pm, cfg, out / "hf", tokenizer, info.is_main, saved=ckpt.complete(cfg.trainer.max_steps),
                      adapters=adapters)
    elif cfg.trainer.export_hf:
        from trainer.export import export_hf

        # Streamed: one full tensor at a time on rank 0, never a full copy of the model on any rank.
        export_hf(pm, cfg, out / "hf", tokenizer, info.is_main, saved=ckpt.complete(cfg.trainer.max_steps))
    if info.is_main:
        exported = ""
        if cfg.trainer.export_hf and cfg.model.lora.enabled:
            exported = ", hf_adapter/ (PEFT adapter)" + (", hf/ (merged)" if cfg.trainer.export_merged else "")
        elif cfg.trainer.export_hf:
            exported = ", hf/ (safetensors model + tokenizer)"
        print(f"done: {cfg.trainer.max_steps} steps. Outputs in {out.resolve()}: config.yaml, metrics.jsonl"
              + (", checkpoints/" if ckpt.complete(cfg.trainer.max_steps) else "") + exported, flush=True)
    return out


@dataclasses.dataclass
class Run:
    """What the step loop works with, built once by train()."""

    cfg: Config
    info: RankInfo
    device: torch.device
    pm: ParallelModel
    opt: StageOptimizers
    ckpt: Checkpointer
    loader: GlobalBatchLoader
    logger: MetricsLogger
    val: list[dict[str, torch.Tensor]]  # the validation batches, each a global batch
    signals: PreemptionSignals
    dpo: Optional[DpoObjective] = None  # trainer.objective=dpo (trainer/dpo_run.py)


def _run_steps(run: Run, start: int, tokens: int) -> None:
    """Steps start+1 .. max_steps, each a sequence of named decisions.

    A step moves data from device to host once: step_totals' single tensor (loss, grad norm, flags,
    per-document sums), which is also the step's only sync point and so the boundary its time is measured at.
    """
    cfg, pm, opt, ckpt, t = run.cfg, run.pm, run.opt, run.ckpt, run.cfg.trainer
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    padded = pm.dims.padded_vocab(cfg.model)
    meter = StepMeter(run.device, pm.dims.world_size, t.peak_tflops)
    nonfinite = NonfinitePolicy(t, run.info, run.device, run.logger)
    boundary = time.perf_counter()
    for step in range(start + 1, t.max_steps + 1):
        batch = next(run.loader)
        facts = batch_facts(batch, cfg, padded)
        doc_loss = DocumentLoss(batch["sample_ids"], run.device)
        pairs = run.dpo.pairs(batch, run.device) if run.dpo is not None else None
        ref_sums = run.dpo.online_reference(pairs, batch, run.device, cp_group(pm)) if pairs is not None else None
        local_sum = forward_backward(pm, local_batch(batch, pm), facts.normalizer, cfg, run.device, doc_loss, pairs)
        grad_norm = _reduce_and_clip_grads(pm, max_norm)
        totals = step_totals(local_sum, grad_norm, doc_loss, run.signals.received, pm, ckpt.save_flags(), ref_sums)
        now = time.perf_counter()
        seconds, boundary = now - boundary, now
        if pairs is not None:  # the preference loss and TRL's metrics, from the reduced per-document sums
            objective = pairs.metrics(totals.doc_totals, totals.ref_sums)
        else:
            objective = {"loss": totals.loss_sum / facts.normalizer,
                         "loss_per_doc": doc_loss.value(lambda _: totals.doc_totals)}
        loss, grad_norm, lr = objective["loss"], totals.grad_norm, opt.lr
        skipped = nonfinite.skip_update(step, loss, grad_norm, totals, local_sum, pm)  # or RunExit: stop
        if skipped:
            opt.zero_grad()
        else:
            opt.step()
            opt.zero_grad()
            precompute_fsdp_scales(pm.modules, cfg, pm.dims.fsdp_enabled)  # tensorwise fp8 under FSDP only
        tokens += facts.slots
        # The reduced per-document sums stand in for DocumentLoss.value's own reduction.
        record = {"step": step, **objective, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": facts.real_tokens / seconds, "packing_efficiency": facts.packing_efficiency,
                  **meter.throughput(facts.flops, seconds), **totals.moe}
        if skipped:
            record["skipped"] = True
        if eval_due(t, step) and run.dpo is not None:
            record.update(run.dpo.evaluate(pm, run.val, run.device))
        elif eval_due(t, step):
            v = evaluate(pm, run.val, cfg, run.device)
            record.update(val_loss=v, val_ppl=perplexity(v))
        if log_due(t, step, record):
            run.logger.log({**record, **meter.memory()})
        if _step_boundary(run, step, totals, tokens) or "val_loss" in record:
            boundary = time.perf_counter()  # a save's or an evaluation's time is not the next step's


def _reduce_and_clip_grads(pm: ParallelModel, max_norm: float) -> torch.Tensor:
    """The tied embedding's two pipeline copies summed, then the global gradient norm (clipped to max_norm)."""
    if pm.dims.pp_enabled:  # every pp rank takes part, holder of a tied copy or not
        from parallel.pipeline import tied_embedding_grad_sync

        tied_embedding_grad_sync(pm.stages, pm.mesh["pp"])
    return clip_grad_norm_(pm.parameters(), max_norm, pm.mesh, pm.duplicates)


def eval_due(t: TrainerConfig, step: int) -> bool:
    """Validation every trainer.eval_every steps and after the last one (0: never)."""
    return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.max_steps)


def log_due(t: TrainerConfig, step: int, record: dict) -> bool:
    """A metrics record every trainer.log_every steps, at each evaluation and after the last step."""
    return step % t.log_every == 0 or "val_loss" in record or step == t.max_steps


def _step_boundary(run: Run, step: int, totals, tokens: int) -> bool:
    """Commit, save or stop, as every rank agreed in step_totals (preemption, background saves written);
    returns whether this step saved a checkpoint."""
    ckpt = run.ckpt
    ckpt.at_step_boundary(totals.writing_ranks, totals.failed_save_ranks)
    if totals.preempted and not run.signals.received:
        run.signals.heard_elsewhere()
    saving = ckpt.should_save(step, totals.preempted)
    if saving:
        ckpt.save(step, run.pm, run.opt, run.loader, tokens)
    elif ckpt.should_save_before_export(step):
        save_before_export(ckpt, step, run.pm, run.opt, run.loader, tokens, run.logger)
        saving = True
    if totals.preempted:
        ckpt.wait()
        raise RunExit(run.signals.exit_code, f"{run.signals.what} at step {step}: checkpoint saved under "
                                             f"{ckpt.root.resolve()}; {resume_hint(ckpt.root.parent)}")
    return saving


class NonfinitePolicy:
    """A non-finite loss or gradient norm: stop (trainer.nonfinite=stop, exit 3), or skip the step's update
    (skip) at most trainer.max_consecutive_skips times in a row. The ranks where it appeared are found only
    then (one more collective, on this path alone)."""

    def __init__(self, t: TrainerConfig, info: RankInfo, device: torch.device, logger: MetricsLogger):
        self.t, self.info, self.device, self.logger = t, info, device, logger
        self.skips = 0

    def skip_update(self, step: int, loss: float, grad_norm: float, totals, local_sum: torch.Tensor,
                    pm: ParallelModel) -> bool:
        bad_loss = totals.nonfinite_loss_ranks > 0 or not math.isfinite(loss)
        if not (bad_loss or not math.isfinite(grad_norm)):
            self.skips = 0
            return False
        t = self.t
        ranks = ranks_where(not locally_finite(local_sum, pm), self.info, self.device)
        what = (f"non-finite {'loss' if bad_loss else 'gradient norm'} at step {step} "
                f"(loss {loss}, grad_norm {grad_norm}), from rank(s) {ranks}")
        if t.nonfinite == "stop" or self.skips >= t.max_consecutive_skips:
            why = ("trainer.nonfinite=stop" if t.nonfinite == "stop"
                   else f"{self.skips} consecutive skipped steps already (trainer.max_consecutive_skips)")
            raise RunExit(EXIT_NONFINITE, f"{what}; stopping ({why}), no checkpoint saved for this step")
        self.skips += 1
        self.logger.write(f"warning: {what}; skipping this step's update ({self.skips} in a row, "
                          f"trainer.nonfinite=skip)")
        return True


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def write_run_config(out: Path, cfg: Config) -> str:
    """Rank 0: the output directory and its config.yaml (whole or not at all); '' or, for a full disk, why (the
    directory removed again when this call made it)."""
    text = resolved_yaml(cfg)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", text)
    except OSError as e:
        if not is_no_space(e):
            raise
        if made:
            shutil.rmtree(out, ignore_errors=True)
        return str(NoSpace("config.yaml", out, len(text.encode()),
                           "free space there or set trainer.output_dir on a larger filesystem"))
    return ""


def save_before_export(ckpt: Checkpointer, step: int, pm, opt, loader, tokens: int, logger) -> None:
    """The last step's checkpoint of a run that saves none otherwise (trainer.checkpoint.save_before_export), so
    a failed HF export never loses the trained weights. A full disk here does not stop the run: the export is
    smaller (no optimizer state) and may still fit; the warning says it will be the only copy."""
    try:
        ckpt.save(step, pm, opt, loader, tokens)
        ckpt.wait()
    except RunExit as e:
        if e.code != EXIT_NO_SPACE:
            raise
        logger.write(f"warning: checkpoint before the HF export: {e}; exporting without it, so hf/ will be the "
                     f"only copy of the trained weights")


def stop_if_signalled_before_the_steps(signals: PreemptionSignals, info: RankInfo, device: torch.device,
                                       start: int, out) -> None:
    """A SIGTERM/SIGUSR1 (or Ctrl-C) that came during start-up (handlers are installed by the entry point's
    first lines) ends the run before its first step, exit 75 (130): nothing new to save. All ranks agree
    first (one collective per run, not per step), so a signal to one rank stops every rank at the same place."""
    flagged = ranks_where(signals.received, info, device)
    if not flagged:
        return
    saved = f"the checkpoint of step {start} stands" if start else "nothing to save yet"
    raise RunExit(signals.exit_code, f"{signals.what} on rank(s) {flagged} during start-up, before step "
                                     f"{start + 1}: {saved}; {resume_hint(out)}")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def locally_finite(local_sum: torch.Tensor, pm) -> bool:
    """This rank's own loss and gradient shards are finite (the non-finite path only: it syncs once)."""
    checks = [torch.isfinite(local_sum).all()]
    checks += [torch.isfinite(_local(p.grad)).all() for p in pm.parameters() if p.grad is not None]
    return bool(torch.stack(checks).all())


def ranks_where(flag: bool, info: RankInfo, device: torch.device) -> list[int]:
    """Global ranks whose flag is set (a collective: every rank calls it)."""
    import torch.distributed as dist

    if info.world_size == 1 or not dist.is_initialized():
        return [0] if flag else []
    v = torch.zeros(info.world_size, device=device)
    v[info.rank] = float(flag)
    dist.all_reduce(v)
    return [r for r, bad in enumerate(v.tolist()) if bad > 0]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the resumed checkpoint's step: they are about to be logged again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def cfg_param_count(cfg: Config) -> int:
    """Parameters of the unpadded model, from its shape alone (no rank holds all of them). An MoE layer
    counts all E experts (the memory a run holds), not the top-k a token uses (trainer/flops.py counts those)."""
    m = cfg.model
    h, hd, q, kv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups
    attn = h * (q + 2 * kv) * hd + q * hd * h
    attn += (q + 2 * kv) * hd if m.add_qkv_bias else 0
    attn += 2 * hd if m.qk_layernorm else 0
    dense_mlp = 3 * h * m.ffn_hidden_size
    moe_layers = len(m.moe.moe_layers(m.num_layers)) if m.moe.enabled else 0
    moe_mlp = moe_layer_params(m, m.moe.num_moe_experts) if moe_layers else 0  # all E experts are held
    mlps = (m.num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
    heads = m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * (attn + 2 * h) + mlps + heads + h
