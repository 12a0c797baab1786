"""AdamW with weight-decay groups and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from trainer.config import OptimConfig


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never norms or biases, as in Megatron and nanoGPT."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    # An empty group (LoRA's adapters are all matrices) is left out: DCP's flattened optimizer state cannot load
    # one back.
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.AdamW(
        param_groups(params, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)


class StageOptimizers:
    """One AdamW and one LR schedule per model part (pipeline stage) on this rank, driven as one.

    torch.distributed.checkpoint's get/set_optimizer_state_dict map an optimizer's parameters to FQNs of
    one module, so each stage module gets its own optimizer (torchtitan's OptimizersContainer does the
    same). AdamW's update is per parameter, so the split changes no number.
    """

    def __init__(self, modules: list[nn.Module], cfg: OptimConfig, device: torch.device, max_steps: int):
        seen: set[int] = set()
        self.optimizers = []
        for m in modules:
            # Only what trains: LoRA's frozen base gets no optimizer state (trainer/lora.py).
            params = [p for p in m.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            self.optimizers.append(build_optimizer(params, cfg, device))
        self.schedulers = [build_scheduler(o, cfg, max_steps) for o in self.optimizers]

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
        for s in self.schedulers:
            s.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def scheduler_state(self) -> list[dict]:
        return [s.state_dict() for s in self.schedulers]

    def load_scheduler_state(self, states: list[dict]) -> None:
        # Every part's schedule is the same function of the step: any saved one fits any layout's parts.
        for s in self.schedulers:
            s.load_state_dict(states[0])
