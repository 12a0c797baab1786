"""Tokens/s of meshtron's trainer against a bare PyTorch loop over the same model and the same batches.

    .venv/bin/python bench/trainer_overhead.py [--steps 6] [--warmup 2] [--rounds 2] [--profile] [overrides]

Both sides train the same GPTModel (built from the same config and seed) with AdamW on the same global
batches, split into the same micro-batches, with gradient clipping and one loss read-back per step. The
trainer runs as `python -m trainer` does (trainer.loop.train, single process); the bare loop is what a
hand-written nanoGPT-style loop does and nothing else. Runs alternate (trainer, bare, trainer, bare, ...)
in one process so a change in machine load hits both sides; each side's first --warmup steps of every run
are excluded and the median step of the rest is reported. Tokens are real (non-padding) tokens, counted the
same way on both sides; the trainer's figure is its own tokens_per_s metric.

--profile adds a cProfile of one more trainer run and lists the functions of trainer/ and parallel/ (and
what they call outside the model's forward/backward) by their own time: the overhead that remains.

The default model (~21M parameters: hidden 512, 6 layers, seq 256) keeps the step well above Python's
per-step costs on a CPU; trailing Hydra overrides change it (e.g. model.num_layers=2 for a smoke run).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = ["model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_layers=6",
         "model.num_attention_heads=8", "model.num_query_groups=4", "model.init_std=0.02"]
RUN = ["data.seq_len=256", "trainer.global_batch_size=4", "parallel.microbatch_size=2", "trainer.eval_every=0",
       "trainer.export_hf=false", "logging.wandb=false", "trainer.log_every=1", "trainer.device=cpu",
       "trainer.checkpoint.every_steps=0"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from trainer.config_io import to_config

    with initialize_config_module(config_module="conf", version_base="1.3"):
        return to_config(hydra_compose("config", overrides=overrides))


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Slots holding a document token (padding has document id -1), as the trainer counts them."""
    if "document_ids" not in batch:
        return batch["input_ids"].numel()
    from trainer.flops import real_tokens as count_real

    return count_real(batch["document_ids"].numpy())


# ------------------------------------------------------------------------------------------ trainer


def trainer_rates(cfg, out: Path, warmup: int) -> list[float]:
    """tokens/s of each step after the warm-up, from the trainer's own metrics.jsonl."""
    import dataclasses

    from trainer.distributed import RankInfo
    from trainer.loop import train

    run_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, output_dir=str(out)))
    train(run_cfg, RankInfo(0, 1, 0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows[warmup:]]


# --------------------------------------------------------------------------------------------- bare


def the_batches(cfg, steps: int) -> list[dict[str, torch.Tensor]]:
    """The global batches the trainer draws, in its order (same rows, same seed, same packing)."""
    from trainer.data.build import build_split
    from trainer.data.loader import GlobalBatchLoader
    from trainer.data.pretrain import default_cache_dir
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    rows = build_split(cfg.data, tokenizer, "train", default_cache_dir(cfg.data)).rows
    loader = GlobalBatchLoader(rows, cfg.trainer.global_batch_size, seed=cfg.trainer.seed)
    try:
        return [next(loader) for _ in range(steps)]
    finally:
        loader.close()


def bare_model(cfg):
    from trainer.model.shapes import padded_vocab_size
    from trainer.model import GPTModel

    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    model = GPTModel(cfg.model, padded_vocab_size=padded, seed=cfg.trainer.seed)
    model.loss_chunk_size = cfg.trainer.loss_chunk_size
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)
    return model, opt


def model_inputs(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword inputs GPTModel takes; one-document rows drop document_ids (plain causal attention),
    as the trainer's host-side attention metadata does, so both sides run the same attention kernel."""
    try:
        from trainer.data.attention_meta import attention_metadata
    except ImportError:  # an older trainer: every row passes its document ids
        attention_metadata = None
    if attention_metadata is not None:
        mb = attention_metadata(mb, False)
    return {k: mb[k] for k in ("position_ids", "document_ids", "doc_lens") if k in mb}


def bare_rates(cfg, batches: list[dict[str, torch.Tensor]], warmup: int) -> list[float]:
    model, opt = bare_model(cfg)
    mbs = cfg.parallel.microbatch_size
    rates = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        valid = int((batch["labels"] != -100).sum())
        total = torch.zeros(())
        for j in range(0, batch["input_ids"].shape[0], mbs):
            mb = {k: v[j:j + mbs] for k, v in batch.items()}
            loss = model(mb["input_ids"], labels=mb["labels"], **model_inputs(mb)).sum()
            (loss / valid).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(total)  # the loss a loop logs: its one read-back per step
        if i >= warmup:
            rates.append(real_tokens(batch) / (time.perf_counter() - t0))
    return rates


# ----------------------------------------------------------------------------------------- profile


def profile_trainer(cfg, out: Path, top: int) -> str:
    """Own time of the functions outside torch's forward/backward kernels in one trainer run."""
    prof = cProfile.Profile()
    prof.enable()
    trainer_rates(cfg, out, 0)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
    mine = ("/trainer/", "/parallel/", "/conf/", "threading.py", "queue.py", "json", "wandb")
    stats.print_stats("|".join(m.replace(".", r"\.") for m in mine), top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="trainer/bare run pairs, alternated")
    parser.add_argument("--profile", action="store_true", help="cProfile one more trainer run")
    args, extra = parser.parse_known_args()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="meshtron-overhead-") as tmp:
        os.environ.setdefault("WANDB_MODE", "disabled")
        os.environ["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME") or str(Path(tmp) / "cache")
        cfg = compose([*MODEL, *RUN, f"trainer.max_steps={total}", *extra])
        batches = the_batches(cfg, total)
        print(f"model: {cfg.model.hidden_size} hidden x {cfg.model.num_layers} layers, seq {cfg.data.seq_len}, "
              f"{cfg.trainer.global_batch_size} rows per step in micro-batches of {cfg.parallel.microbatch_size}, "
              f"{torch.get_num_threads()} threads; {args.rounds} x {args.steps} steps per side "
              f"(+{args.warmup} warm-up each)", flush=True)
        trainer, bare = [], []
        for r in range(args.rounds):
            trainer += trainer_rates(cfg, Path(tmp) / f"trainer{r}", args.warmup)
            bare += bare_rates(cfg, batches, args.warmup)
            print(f"round {r + 1}: trainer {statistics.median(trainer):,.0f} tok/s, "
                  f"bare {statistics.median(bare):,.0f} tok/s", flush=True)
        t, b = statistics.median(trainer), statistics.median(bare)
        print(f"trainer (python -m trainer's loop): {t:,.0f} tokens/s (median of {len(trainer)} steps)")
        print(f"bare PyTorch loop:                  {b:,.0f} tokens/s (median of {len(bare)} steps)")
        print(f"ratio trainer/bare: {t / b:.3f} (goal >= 0.95)")
        if args.profile:
            print(profile_trainer(cfg, Path(tmp) / "profiled", 25))


if __name__ == "__main__":
    main()
