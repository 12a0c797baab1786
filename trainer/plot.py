"""``python -m trainer.plot RUN [RUN ...]``: loss, validation loss and tokens/s of one or more runs, one panel each,
one line per run, from their metrics.jsonl, into a PNG. Compares runs without wandb or TensorBoard.

A RUN is a run's output directory or its metrics.jsonl. Needs matplotlib (pip install 'meshtron[plot]').
Exit codes: 0 written; 2 a bad argument, a run without metrics, or matplotlib missing (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "python -m trainer.plot"
DEFAULT_METRICS = ("loss", "val_loss", "tokens_per_s")
TITLES = {"loss": "training loss", "val_loss": "validation loss", "tokens_per_s": "tokens/s",
          "grad_norm": "gradient norm", "lr": "learning rate", "mfu": "MFU", "loss_per_doc": "loss per document"}


class PlotError(Exception):
    """One line on stderr, exit 2."""


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line, from a run still writing, is left out)."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        what = "no metrics.jsonl in it" if run.is_dir() else "no such file or directory"
        raise PlotError(f"{run}: {what}; expected a run's output directory (trainer.output_dir) or its "
                        f"metrics.jsonl")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):
                continue  # being written
            raise PlotError(f"{path}:{i}: not a JSON object ({line[:60]!r}); the file is damaged") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise PlotError(f"{path}: no logged steps yet")
    return records


def series(records: list[dict], key: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` where it was logged; with smooth > 1, a trailing mean over that many points."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    if smooth > 1:
        values = [sum(values[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1))
                  for i in range(len(values))]
    return steps, values


def labels(runs: list[Path]) -> list[str]:
    """Each run's directory name; the shortest distinct tail of the paths where names repeat."""
    dirs = [(r if r.is_dir() else r.parent).resolve() for r in runs]
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]


def plot(runs: list[Path], out: Path, metrics: Sequence[str] = DEFAULT_METRICS, smooth: int = 1,
         log_y: bool = False) -> list[str]:
    """Write the PNG; returns the metrics drawn (those no run logged are left out, and said)."""
    data = [read_metrics(r) for r in runs]
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'meshtron[plot]' (or matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    drawn = [m for m in metrics if any(series(d, m)[0] for d in data)]
    if not drawn:
        raise PlotError(f"none of the runs logged {', '.join(metrics)}")
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4), squeeze=False)
    for ax, metric in zip(axes[0], drawn):
        for name, records in zip(labels(runs), data):
            steps, values = series(records, metric, 1 if metric.startswith("val_") else smooth)
            if steps:
                ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(TITLES.get(metric, metric) + (f" (mean of {smooth})" if smooth > 1 and
                                                   not metric.startswith("val_") else ""))
        ax.set_xlabel("step")
        if log_y and metric != "tokens_per_s":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise PlotError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Draw loss, validation loss and tokens/s of one or more "
                                                       "runs (their metrics.jsonl) into a PNG.",
                                epilog="examples:\n  python -m trainer.plot outputs/run-a outputs/run-b "
                                       "--out compare.png\n  python -m trainer.plot runs/*/ --metrics loss,"
                                       "grad_norm,lr --smooth 10",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run's output directory or metrics.jsonl")
    p.add_argument("--out", type=Path, default=Path("metrics.png"), help="PNG to write (default metrics.png)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated metrics.jsonl keys, one panel each (default {','.join(DEFAULT_METRICS)})")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="trailing mean over N logged steps (not for val_*; default 1: none)")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axes (not for tokens/s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.smooth < 1:
            raise PlotError(f"--smooth {args.smooth}: must be >= 1")
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not metrics:
            raise PlotError(f"--metrics {args.metrics!r}: name at least one metrics.jsonl key, e.g. loss")
        if args.out.suffix.lower() != ".png":
            raise PlotError(f"--out {args.out}: expected a .png file name")
        drawn = plot(args.runs, args.out, metrics, args.smooth, args.log_y)
    except PlotError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    left = [m for m in metrics if m not in drawn]
    print(f"wrote {args.out} ({', '.join(drawn)} of {len(args.runs)} run(s))"
          + (f"; not logged by any run: {', '.join(left)}" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
