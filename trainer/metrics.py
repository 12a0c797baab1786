"""Where a run's numbers go: metrics.jsonl, the console progress bar, wandb and TensorBoard."""

from __future__ import annotations

import collections
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from trainer.config import Config, LoggingConfig
from trainer.config_io import redact_secrets
from trainer.flops import achieved_tflops, peak_tflops


ETA_WINDOW = 20  # logged steps the ETA is measured over


def wandb_mode(cfg: LoggingConfig, env: Optional[dict] = None) -> str:
    """offline unless the user asked otherwise: WANDB_MODE wins, then an API key means online."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if (cfg.wandb_api_key or env.get("WANDB_API_KEY")) else "offline"


def without_missing_wandb(cfg: Config, is_main: bool) -> Config:
    """``cfg`` with wandb logging off when it is asked for but the package is not installed (it is only needed
    for its curves; metrics.jsonl has every number), said in one line by the main rank at start-up instead of
    an ImportError after the data and model are built. WANDB_MODE=disabled turns it off without a word."""
    import dataclasses
    import importlib.util

    if not cfg.logging.wandb or wandb_mode(cfg.logging) == "disabled" or importlib.util.find_spec("wandb"):
        return cfg
    if is_main:
        print("meshtron: warning: logging.wandb=true but wandb is not installed: metrics go to metrics.jsonl only "
              "(pip install wandb for its curves, or set logging.wandb=false to silence this)",
              file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=False))


class MetricsLogger:
    """One JSON object per logged step in ``metrics.jsonl``, a tqdm bar, and (optionally) a wandb run and
    TensorBoard event files under ``tensorboard/`` with the same scalars, tagged by their metrics.jsonl keys.

    Only the main rank writes; the others construct it with ``enabled=False`` and every call is a no-op.
    """

    def __init__(self, cfg: Config, output_dir: Path, total_steps: int, start_step: int = 0,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._file = None
        self._bar = None
        self._wandb = None
        self._tensorboard = None
        self._print_every = cfg.logging.console_every or max(1, (total_steps - start_step) // 10)
        self._recent: collections.deque = collections.deque(maxlen=ETA_WINDOW)  # (time, step) of recent logs
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        # A live bar on a terminal; in a log file (Slurm, CI) the periodic lines below carry rate and ETA.
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stdout, mininterval=1.0,
                         disable=not sys.stdout.isatty())
        self._start_step = start_step
        self._total = total_steps
        every = cfg.trainer.log_every
        self.write(f"console: a line every {self._print_every} step(s) and at each evaluation "
                   f"(logging.console_every=N to change); metrics.jsonl: every {every} step(s)")
        if cfg.logging.wandb:
            self._wandb = _start_wandb(cfg, output_dir, resuming=start_step > 0)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what an earlier attempt logged after its checkpoint, as
            # truncate_metrics does for metrics.jsonl, so each step has one value.
            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"), flush_secs=30,
                                              purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._tensorboard is not None:
            for k, v in scalars(record).items():
                self._tensorboard.add_scalar(k, v, global_step=record["step"])
        self._bar.update(record["step"] - self._bar.n)
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        step = record["step"]
        eta = self._eta(step)  # every logged step feeds the window, printed or not
        if step == self._start_step + 1 or step % self._print_every == 0 or "val_loss" in record:
            self.write(f"{format_record(record)} | eta {eta}")

    def _eta(self, step: int) -> str:
        """From the steps of the last ETA_WINDOW logs, not from the start: the first steps carry warm-up
        (allocator growth, compilation) that the rest of the run does not repeat."""
        now = time.perf_counter()
        self._recent.append((now, step))
        then, first = self._recent[0]
        if step == first:  # one log so far: only the warm-up step to go by
            return "estimating"
        left = (now - then) / (step - first) * (self._total - step)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers, without the step and flags (skipped): what TensorBoard and plots draw."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class StepMeter:
    """tflops and mfu of a step (model FLOPs per device and second, see trainer/flops.py) and the peak memory
    since the last log: CUDA memory allocated (its peak is reset after each reading), else the process's
    peak RSS. Host-side only: allocator statistics and getrusage, no device sync."""

    def __init__(self, device: torch.device, devices: int, configured_peak: Optional[float] = None):
        self.device, self.devices = device, devices
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_tflops(configured_peak, name)

    def throughput(self, flops: float, seconds: float) -> dict[str, float]:
        tflops = achieved_tflops(flops, seconds, self.devices)
        return {"tflops": tflops, **({"mfu": tflops / self.peak} if self.peak else {})}

    def memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            return {"mem_gib": gib}
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"mem_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def format_record(r: dict[str, Any]) -> str:
    line = (f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad_norm {r['grad_norm']:.3f}"
            f" | {r['tokens_per_s']:,.0f} tok/s")
    if "tflops" in r:
        line += f" | {r['tflops']:.3g} TFLOP/s"
    if "mfu" in r:
        line += f" | mfu {r['mfu']:.1%}"
    if "mem_gib" in r:
        line += f" | mem {r['mem_gib']:.2f} GiB"
    if "rewards/accuracies" in r:  # trainer.objective=dpo
        line += f" | {r['pairs']} pairs | reward acc {r['rewards/accuracies']:.2f} | margin {r['rewards/margins']:.3f}"
    if "val_loss" in r:
        line += f" | val_loss {r['val_loss']:.4f}"
        line += f" | val_ppl {r['val_ppl']:.2f}" if "val_ppl" in r else ""
        line += f" | val reward acc {r['val_rewards/accuracies']:.2f}" if "val_rewards/accuracies" in r else ""
    return line


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))


WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(cfg: Config, output_dir: Path, resuming: bool = False):
    """A new wandb run, or, when this run resumes from a checkpoint (a restart, a Slurm requeue), the run
    whose id the first start stored in ``<output_dir>/wandb_run_id``, so its curves continue in one run."""
    import wandb  # imported only when used: it starts a service process

    from omegaconf import OmegaConf

    lg = cfg.logging
    plain = redact_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    settings = wandb.Settings(silent=True, console="off", api_key=lg.wandb_api_key or None)
    id_file = output_dir / WANDB_ID_FILE
    run_id = read_wandb_id(id_file) if resuming else None
    mode = wandb_mode(lg)
    run = wandb.init(
        project=lg.wandb_project,
        entity=lg.wandb_entity,
        name=lg.wandb_run_name,
        dir=str(output_dir),
        config=plain,
        mode=mode,
        settings=settings,
        id=run_id,
        resume="allow" if run_id else None,
    )
    if mode != "disabled" and getattr(run, "id", None) and run.id != run_id:
        tmp = id_file.with_name(f".{WANDB_ID_FILE}.tmp")
        tmp.write_text(run.id + "\n")
        os.replace(tmp, id_file)
    return run


def read_wandb_id(path: Path) -> Optional[str]:
    """The stored run id, or None if there is none (or it is not a plausible wandb id)."""
    if not path.is_file():
        return None
    value = path.read_text().strip()
    return value if value and len(value) <= 128 and all(c.isalnum() or c in "-_" for c in value) else None
