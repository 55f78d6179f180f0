"""Figures, in matplotlib only. Functions return a Figure; tracking decides where it goes."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs under `mlflow run`, CI and SSH sessions alike

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def gradient_norms(norms: Mapping[str, Sequence[float]], title: str,
                   batches_per_epoch: int | None = None):
    """The notebook's plot, readable at a glance: one line per layer, log y, x = batch.

    Exact zeros (dead gradients) cannot sit on a log axis; they are left out of the line
    and counted in the legend instead, so a collapse is never silently hidden.
    """
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = [plt.cm.tab10(i % 10) for i in range(len(norms))]
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("L2 norm of dLoss/d(layer output)")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(title="layer (input side first)", fontsize=9, loc="best")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


VARIANT_COLOURS = {"noskip": "tab:red", "skip": "tab:blue"}
VARIANT_LABELS = {"noskip": "without skip", "skip": "with skip"}


def _smooth_log(y: np.ndarray, window: int) -> np.ndarray:
    """Rolling mean of log10(norm) over finite, non-zero points; NaN where none."""
    logs = np.where((y > 0) & np.isfinite(y), np.log10(np.where(y > 0, y, 1.0)), np.nan)
    ok = ~np.isnan(logs)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, logs, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return 10.0 ** (sums / counts)


def comparison_norms(histories, layers: Sequence[str], model: str):
    """One panel per layer, both variants overlaid: raw values faint, a smoothed line on top.

    ``histories``: {variant: DataFrame(step, layer, norm)}.
    """
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 2.3 * len(layers) + 0.8),
                             sharex=True, squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        for variant, history in histories.items():
            h = history[history["layer"] == layer].sort_values("step")
            x, y = h["step"].to_numpy(), h["norm"].to_numpy(dtype=np.float64)
            colour = VARIANT_COLOURS.get(variant)
            shown = np.where((y > 0) & np.isfinite(y), y, np.nan)
            ax.plot(x, shown, lw=0.5, alpha=0.25, color=colour)
            window = max(1, len(y) // 100)
            zero = (y == 0).mean() if len(y) else 0.0
            label = VARIANT_LABELS.get(variant, variant) + (f" ({zero:.0%} zero)" if zero else "")
            ax.plot(x, _smooth_log(y, window), lw=1.6, color=colour, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("norm")
        ax.set_title(layer, loc="left", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("batch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Gradient norms dLoss/d(output) - {model}, skip vs no skip (faint: raw; "
                 "line: rolling mean of log10)", fontsize=11)
    fig.tight_layout()
    return fig


def depth_profile(table, model: str):
    """Median norm per layer against depth, 10-90% band, one line per variant.

    ``table``: the compare summary (columns depth, layer, variant, median, p10, p90).
    """
    fig, ax = plt.subplots(figsize=(9, 5))
    for variant, rows in table.groupby("variant", sort=False):
        rows = rows.sort_values("depth")
        colour = VARIANT_COLOURS.get(variant)
        x = rows["depth"].to_numpy()
        floor = lambda v: np.where(v > 0, v, np.nan)  # noqa: E731 - zeros cannot sit on log axes
        ax.fill_between(x, floor(rows["p10"].to_numpy()), floor(rows["p90"].to_numpy()),
                        color=colour, alpha=0.2, lw=0)
        ax.plot(x, floor(rows["median"].to_numpy()), marker="o", color=colour,
                label=VARIANT_LABELS.get(variant, variant) + " (median, 10-90% band)")
    layers = table.sort_values("depth").drop_duplicates("depth")
    ax.set_xticks(layers["depth"].to_numpy(), layers["layer"].tolist(), rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("probed layer, input side first")
    ax.set_ylabel("L2 norm of dLoss/d(layer output)")
    ax.set_title(f"Gradient norm against depth - {model}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def _log10_floor(norms: np.ndarray) -> tuple[np.ndarray, float]:
    """log10 of the norms, zeros (and non-finite values) set to a floor one decade below the
    smallest positive norm (-30 when there is none)."""
    norms = np.asarray(norms, dtype=np.float64)
    positive = norms[(norms > 0) & np.isfinite(norms)]
    floor = float(np.floor(np.log10(positive.min()))) - 1 if len(positive) else -30.0
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where((norms > 0) & np.isfinite(norms), norms, 1.0))
    return np.where((norms > 0) & np.isfinite(norms), logs, floor), floor


def gradient_flow(steps, layers: Sequence[str], norms, title: str,
                  batches_per_epoch: int | None = None):
    """Heatmap of log10(norm): one row per probed layer (input side at the top, forward
    order), one column per step. Exact zeros (and non-finite values) get the floor colour,
    black, below the scale; the colour bar's label says so."""
    steps = np.asarray(steps)
    logs, floor = _log10_floor(np.asarray(norms).reshape(len(steps), len(layers)))
    fig, ax = plt.subplots(figsize=(12, max(3.5, 0.16 * len(layers) + 2)))
    if len(steps):
        x0, x1 = steps[0] - 0.5, steps[-1] + 0.5
        cmap = plt.get_cmap("viridis").with_extremes(under="black")
        image = ax.imshow(logs.T, aspect="auto", interpolation="nearest", cmap=cmap,
                          extent=(x0, x1, len(layers) - 0.5, -0.5), vmin=floor + 0.5,
                          vmax=max(float(logs.max()), floor + 1.5))
        bar = fig.colorbar(image, ax=ax, extend="min")
        bar.set_label(f"log10 L2 norm of dLoss/d(output); black = exactly zero "
                      f"(the floor, drawn as {floor:g})")
        if batches_per_epoch:
            for b in range(int(steps[0]) // batches_per_epoch * batches_per_epoch
                           + batches_per_epoch, int(steps[-1]) + 1, batches_per_epoch):
                ax.axvline(b - 0.5, color="white", lw=0.6, alpha=0.6)
    ticks = np.arange(len(layers))
    if len(layers) > 40:  # every other name would still overlap: a readable subset
        ticks = np.unique(np.append(ticks[::int(np.ceil(len(layers) / 40))], len(layers) - 1))
    ax.set_yticks(ticks, [layers[i] for i in ticks], fontsize=7)
    ax.set_xlabel("batch")
    ax.set_ylabel("layer (forward order: input at the top)")
    ax.set_title(f"Gradient flow - {title}")
    fig.tight_layout()
    return fig


def profile_steps(steps) -> list[int]:
    """Row indices of the first step, 25%, 50% and the last (duplicates dropped)."""
    n = len(steps)
    return list(dict.fromkeys(min(n - 1, int(round(f * (n - 1)))) for f in (0, 0.25, 0.5, 1.0))) if n else []


def depth_profile_at_steps(steps, layers: Sequence[str], norms, title: str,
                           batches_per_epoch: int | None = None):
    """Norm against depth (forward order) at the first step, 25%, 50% and the last; zeros
    cannot sit on a log axis and are marked with an x on the bottom edge."""
    steps = np.asarray(steps)
    norms = np.asarray(norms, dtype=np.float64).reshape(len(steps), len(layers))
    fig, ax = plt.subplots(figsize=(max(9, 0.18 * len(layers) + 3), 5))
    x = np.arange(len(layers))
    for i, row in enumerate(profile_steps(steps)):
        y = norms[row]
        colour = plt.cm.viridis(i / 3)
        ax.plot(x, np.where((y > 0) & np.isfinite(y), y, np.nan), marker="o", ms=3,
                color=colour, label=f"step {int(steps[row])}")
        zero = x[y == 0]
        if len(zero):
            ax.plot(zero, np.zeros(len(zero)), "x", color=colour, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=f"step {int(steps[row])}: zero")
    ticks = x if len(layers) <= 40 else x[::int(np.ceil(len(layers) / 40))]
    ax.set_xticks(ticks, [layers[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    if np.any((norms > 0) & np.isfinite(norms)):
        ax.set_yscale("log")
    ax.set_xlabel("layer, input side first")
    ax.set_ylabel("L2 norm of dLoss/d(layer output)")
    ax.set_title(f"Gradient norm against depth - {title}")
    ax.grid(True, axis="y", alpha=0.3)
    if len(steps):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
