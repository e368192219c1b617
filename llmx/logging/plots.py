"""Loss-curve PNGs from metrics.jsonl, for a run and for a comparison of runs.

matplotlib is imported only when a plot is drawn (it costs about a second), and through its
object-oriented Figure + Agg canvas rather than pyplot, so no global backend is switched and no
display is needed on a cluster node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from llmx.logging.metrics import TRAIN_LOSS, VAL_LOSS, read_metrics
from llmx.utils import LlmxError

# Accepted spellings, first match wins, so runs logged by other tools still plot.
TRAIN_LOSS_KEYS = (TRAIN_LOSS, "train_loss", "train/loss")
VAL_LOSS_KEYS = (VAL_LOSS, "val/loss", "eval_loss", "eval/loss")


def series(records: Iterable[dict], keys: Sequence[str]) -> tuple[list[float], list[float]]:
    """(steps, values) of the first key in `keys` present in the records, skipping lines without it."""
    records = list(records)
    for key in keys:
        xs, ys = [], []
        for rec in records:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in rec:
                xs.append(rec["step"])
                ys.append(float(value))
        if xs:
            return xs, ys
    return [], []


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig, ax, out: Path, title: str, log_y: bool, empty: bool) -> Path:
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if empty:
        ax.text(0.5, 0.5, "no loss values logged yet", ha="center", va="center", transform=ax.transAxes)
    else:
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        n = len(ax.get_legend_handles_labels()[1])
        ax.legend(fontsize="small" if n <= 8 else "x-small", ncol=1 + n // 12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def plot_run(run_dir: os.PathLike | str, log_y: bool = False, out: Optional[os.PathLike | str] = None) -> Path:
    """Write run_dir/loss_curve.png: train loss as a line, val loss as markers, against step."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise LlmxError(f"no metrics.jsonl in {run_dir}")
    records = read_metrics(run_dir)
    fig, ax = _figure()
    tx, ty = series(records, TRAIN_LOSS_KEYS)
    vx, vy = series(records, VAL_LOSS_KEYS)
    if tx:
        ax.plot(tx, ty, label="train", linewidth=1.2)
    if vx:
        ax.plot(vx, vy, "o", label="val", markersize=5)
    return _finish(fig, ax, Path(out) if out else run_dir / "loss_curve.png", run_dir.name, log_y, not (tx or vx))


def plot_comparison(
    runs: Sequence[tuple[str, os.PathLike | str]], out: os.PathLike | str, log_y: bool = False
) -> Path:
    """Overlay the loss curves of several runs, given as (label, run_dir): one colour per run, train
    as a line and val as markers of the same colour."""
    fig, ax = _figure()
    any_data = False
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, run_dir), color in zip(runs, colors):
        records = read_metrics(run_dir)
        tx, ty = series(records, TRAIN_LOSS_KEYS)
        vx, vy = series(records, VAL_LOSS_KEYS)
        if tx:
            ax.plot(tx, ty, color=color, label=f"{label} train", linewidth=1.0)
        if vx:
            ax.plot(vx, vy, "o", color=color, label=f"{label} val", markersize=4)
        any_data = any_data or bool(tx or vx)
    return _finish(fig, ax, Path(out), "loss curves", log_y, not any_data)
