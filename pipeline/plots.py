"""Figures, in matplotlib only. Functions return a Figure; tracking decides where it goes."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs under `mlflow run`, CI and SSH sessions alike

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gradient_norms(norms: Mapping[str, Sequence[float]], title: str,
                   batches_per_epoch: int | None = None):
    """The notebook's plot, readable at a glance: one line per layer, log y, x = batch.

    Exact zeros (dead gradients) cannot sit on a log axis; they are left out of the line
    and counted in the legend instead, so a collapse is never silently hidden.
    """
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, max(1, len(norms))))
    for colour, (layer, values) in zip(colours, norms.items()):
        y = np.asarray(values, dtype=np.float64)
        x = np.arange(len(y))
        zero = y == 0
        shown = np.where(zero | ~np.isfinite(y), np.nan, y)
        label = layer
        if len(y) and (zero.any() or not np.isfinite(y).all()):
            label += f"  ({zero.mean():.0%} zero"
            bad = (~np.isfinite(y)).sum()
            label += f", {bad} non-finite)" if bad else ")"
        ax.plot(x, shown, lw=0.8, color=colour, label=label,
                marker="." if len(y) < 50 else None)
    if batches_per_epoch and norms and len(next(iter(norms.values()))) > batches_per_epoch:
        total = len(next(iter(norms.values())))
        for b in range(batches_per_epoch, total, batches_per_epoch):
            ax.axvline(b, color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("L2 norm of dLoss/d(layer output)")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(title="layer (input side first)", fontsize=9, loc="best")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
