"""Loss curves without wandb: TensorBoard event files with metrics.jsonl's scalars (read back by TensorBoard's own
reader), and ``python -m trainer.plot`` drawing one or more runs into a PNG."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import metrics, plot
from trainer.config import Config, LoggingConfig, TrainerConfig
from trainer.errors import ConfigError

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _record(step: int, loss: float) -> dict:
    r = {"step": step, "loss": loss, "loss_per_doc": loss + 0.5, "lr": 1e-3 * step, "grad_norm": 2.0 / step,
         "tokens": 128 * step, "tokens_per_s": 1000.0 + step, "packing_efficiency": 0.9}
    if step % 2 == 0:
        r.update(val_loss=loss + 0.25, val_ppl=3.0)
    if step == 3:
        r["skipped"] = True  # a flag: in metrics.jsonl, not a scalar
    return r


def _read_tb(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _logger(run: Path, start: int = 0, tensorboard: bool = True) -> metrics.MetricsLogger:
    cfg = Config(trainer=TrainerConfig(max_steps=4), logging=LoggingConfig(wandb=False, tensorboard=tensorboard))
    return metrics.MetricsLogger(cfg, run, 4, start_step=start)


def test_tensorboard_has_the_scalars_of_metrics_jsonl(tmp_path):
    logger = _logger(tmp_path)
    for step in range(1, 5):
        logger.log(_record(step, 5.0 - step))
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "skipped"):
                expected.setdefault(k, []).append((r["step"], v))
    got = _read_tb(tmp_path)
    assert got.keys() == expected.keys()
    for tag, points in expected.items():  # float32 in the event files
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_a_resumed_run_replaces_what_was_logged_after_its_checkpoint(tmp_path):
    first = _logger(tmp_path)
    for step in range(1, 5):
        first.log(_record(step, 10.0 + step))
    first.close()
    resumed = _logger(tmp_path, start=2)  # the checkpoint was step 2: steps 3 and 4 run again
    for step in (3, 4):
        resumed.log(_record(step, 20.0 + step))
    resumed.close()
    assert _read_tb(tmp_path)["loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_tensorboard_missing_is_a_configuration_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.tensorboard=true needs the tensorboard package.*"
                                          r"meshtron\[tensorboard\].*logging.tensorboard=false"):
        LoggingConfig(tensorboard=True).validate()
    LoggingConfig(tensorboard=False).validate()


def test_a_run_writes_tensorboard_event_files(tmp_path):
    from tests.integration.test_checkpoint import SMALL

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "trainer", *SMALL, "trainer.max_steps=3",
                           "logging.tensorboard=true", f"trainer.output_dir={run}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in _read_tb(run)["loss"]] == pytest.approx(losses, rel=1e-6)


# ------------------------------------------------------------------------------------------ plot


def _run(path: Path, losses: list[float], torn: bool = False) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps(_record(i + 1, v)) for i, v in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9, \"lo" if torn else "\n"))
    return path


def test_plot_draws_several_runs_into_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _run(tmp_path / "a" / "run", [4.0, 3.0, 2.5, 2.0])
    b = _run(tmp_path / "b" / "run", [4.2, 3.5, 3.0, 2.8], torn=True)  # still being written
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b / "metrics.jsonl"), "--out", str(out), "--smooth", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (loss, val_loss, tokens_per_s of 2 run(s))"
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 3 * image.shape[0] // 2  # three panels side by side
    assert plot.labels([a, b]) == ["a/run", "b/run"]
    assert plot.series(plot.read_metrics(b), "loss", smooth=2) == ([1, 2, 3, 4], [4.2, 3.85, 3.25, 2.9])
    assert plot.series(plot.read_metrics(a), "val_loss") == ([2, 4], [3.25, 2.25])


@pytest.mark.parametrize("argv,needle", [
    (["{missing}"], "no such file or directory; expected a run's output directory"),
    (["{empty}"], "no metrics.jsonl in it"),
    (["{damaged}"], "metrics.jsonl:1: not a JSON object"),
    (["{good}", "--out", "x.pdf"], "--out x.pdf: expected a .png file name"),
    (["{good}", "--metrics", "nope"], "none of the runs logged nope"),
    (["{good}", "--smooth", "0"], "--smooth 0: must be >= 1"),
    (["{good}", "--smooth", "x"], "argument --smooth: invalid int value: 'x'"),
])
def test_plot_refuses_bad_input_in_one_line(tmp_path, capsys, argv, needle):
    pytest.importorskip("matplotlib")
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "metrics.jsonl").write_text("{oops\n" + json.dumps(_record(1, 1.0)) + "\n")
    _run(tmp_path / "good", [1.0])
    paths = {k: str(tmp_path / k) for k in ("missing", "empty", "damaged", "good")}
    argv = [a.format(**paths) for a in argv]
    assert plot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m trainer.plot: error:") and needle in err[0], err
