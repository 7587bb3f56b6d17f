"""Time-to-accuracy curves: an evaluation metric against training seconds, several runs side by
side (`capsdist viz --curves RUN_DIR... --out FILE.png`).

The points are the metrics.jsonl lines that hold both the metric and `train_time_s`: training
logs them with train.eval_every_s (or train.eval_every) on. Training seconds exclude the in-loop
evaluations, so runs that evaluate at different rates compare fairly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402

from capsdist.errors import UserError  # noqa: E402
from capsdist.run_dir import METRICS, read_metrics  # noqa: E402

CLOCK = "train_time_s"


@dataclass(frozen=True)
class Curve:
    label: str
    seconds: list[float]
    values: list[float]


def read_curve(run_dir: Path, metric: str = "eval_accuracy", label: str = "") -> Curve:
    """`metric` against training seconds from one run's metrics.jsonl, in time order."""
    lines = read_metrics(run_dir)
    points = sorted(
        (float(m[CLOCK]), float(m[metric])) for m in lines if CLOCK in m and metric in m
    )
    if not points:
        why = "does not exist" if not (run_dir / METRICS).exists() else f"has no {metric!r}"
        raise UserError(
            f"{run_dir / METRICS} {why} with {CLOCK}: train with train.eval_every_s=N (or "
            f"train.eval_every) to log {metric} against training seconds"
        )
    seconds, values = (list(column) for column in zip(*points, strict=True))
    return Curve(label or run_dir.name, seconds, values)


def draw_curves(curves: list[Curve], metric: str, path: Path) -> Path:
    """One line per curve, `metric` over training time (minutes from 2 minutes on), the legend
    with each run's best value."""
    longest = max(max(c.seconds) for c in curves)
    unit, per = ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        times = [s / per for s in curve.seconds]
        ax.plot(times, curve.values, marker="o", markersize=3, label=_legend(curve))
    ax.set_xlabel(f"training time ({unit}, in-loop evaluation excluded)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend(curve: Curve) -> str:
    best = max(curve.values)
    return f"{curve.label} (best {best:.4g} at {curve.seconds[curve.values.index(best)]:.0f} s)"


def run_curves(
    run_dirs: list[str], out: str, labels: list[str] | None = None, metric: str = "eval_accuracy"
) -> dict:
    """`capsdist viz --curves`: read every run, draw them into `out`; the result names each
    run's last and best point."""
    labels = labels or []
    if labels and len(labels) != len(run_dirs):
        raise UserError(
            f"--labels gives {len(labels)} names for {len(run_dirs)} runs: give one per run"
        )
    if not out:
        raise UserError("--curves needs --out FILE.png, where the figure goes")
    curves = [
        read_curve(Path(run), metric, labels[i] if labels else "") for i, run in enumerate(run_dirs)
    ]
    path = draw_curves(curves, metric, Path(out))
    summary = [
        {
            "run_dir": run,
            "label": c.label,
            "points": len(c.values),
            f"last_{metric}": c.values[-1],
            f"best_{metric}": max(c.values),
            "last_train_time_s": c.seconds[-1],
        }
        for run, c in zip(run_dirs, curves, strict=True)
    ]
    return {"figure": str(path), "metric": metric, "runs": summary}
