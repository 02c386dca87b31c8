"""What a run writes into RUN_DIR besides checkpoints: metrics.csv (one row per epoch), curves.png, and
the atomic text files (summary.json, ids files) -- so that the training loop reads as a loop."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_metrics", "plot_curves", "atomic_text", "json_default"]


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    keys = list(history[0].keys())
    tmp = run_dir / "metrics.csv.partial"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k) for k in keys})
    os.replace(tmp, run_dir / "metrics.csv")


def plot_curves(run_dir: Path, history: list[dict[str, Any]], task: str) -> Path:
    """RUN_DIR/curves.png: losses on the left, validation metrics on the right. Drawn on an Agg canvas
    without touching pyplot's global backend (a notebook's backend stays as it is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ep = [r["epoch"] + 1 for r in history]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in history], marker="o", label="train")
    ax1.plot(ep, [r["val_loss"] for r in history], marker="o", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    names = ("val_auroc", "val_accuracy") if task == "classification" else ("val_mse", "val_pearson")
    for n in names:
        ax2.plot(ep, [r[n] for r in history], marker="o", label=n)
    ax2.set_xlabel("epoch")
    ax2.legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    tmp = run_dir / "curves.partial.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
