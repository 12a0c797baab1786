"""The console's lines: how often they come (said at the start), and an ETA measured over recent steps."""

from __future__ import annotations

import re

from trainer import metrics
from trainer.config import Config, LoggingConfig, TrainerConfig


def _logger(tmp_path, monkeypatch, clock, total=100, console_every=0):
    cfg = Config(trainer=TrainerConfig(max_steps=total),
                 logging=LoggingConfig(wandb=False, console_every=console_every))
    lines = []
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    logger = metrics.MetricsLogger(cfg, tmp_path, total)
    monkeypatch.setattr(logger, "write", lines.append)
    return logger, lines


def _record(step):
    return {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0}


def test_the_eta_comes_from_recent_steps_not_from_the_warm_up(tmp_path, monkeypatch, capsys):
    clock = [0.0]
    logger, lines = _logger(tmp_path, monkeypatch, clock, total=100, console_every=10)
    assert re.search(r"console: a line every 10 step\(s\) and at each evaluation \(logging.console_every=N to "
                     r"change\); metrics.jsonl: every 1 step\(s\)", capsys.readouterr().out)
    clock[0] = 60.0  # the first step: a minute of warm-up (allocator, compilation)
    logger.log(_record(1))
    assert lines[-1].endswith("| eta estimating")
    for step in range(2, 41):  # then one second a step
        clock[0] += 1.0
        logger.log(_record(step))
    assert [int(line.split()[1]) for line in lines] == [1, 10, 20, 30, 40]
    # 60 steps left at one second each: a minute, not the 2.5 minutes the average since the start would say.
    assert lines[-1].endswith("| eta 00:01:00")
    logger.close()


def test_the_default_prints_about_ten_lines(tmp_path, monkeypatch):
    logger, lines = _logger(tmp_path, monkeypatch, [0.0], total=50)
    for step in range(1, 51):
        logger.log(_record(step))
    assert [int(line.split()[1]) for line in lines] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    logger.close()
