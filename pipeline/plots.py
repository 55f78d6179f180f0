"""Figures, in matplotlib only. Functions return a Figure; tracking decides where it goes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs under `mlflow run`, CI and SSH sessions alike

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def gradient_norms(norms: Mapping[str, Sequence[float]], title: str,
                   batches_per_epoch: int | None = None,
                   quantity: str = "dLoss/d(layer output)"):
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
    ax.set_ylabel(f"L2 norm of {quantity}")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(title="layer (input side first)", fontsize=9, loc="best")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


VARIANT_COLOURS = {"noskip": "tab:red", "skip": "tab:blue"}
VARIANT_LABELS = {"noskip": "without skip", "skip": "with skip"}
SKIP_PAIR = ("noskip", "skip")
PAIR_COLOURS = ("tab:red", "tab:blue")  # a compared pair: the first run, the second


def pair_style(labels: Sequence[str]) -> tuple[dict[str, str], dict[str, str], str]:
    """A compared pair's colours and legend names by label, and its "B vs A" title: a
    skip/noskip pair in the skip connections' words, any other pair by its labels."""
    a, b = labels
    colours = dict(zip(labels, PAIR_COLOURS))
    if tuple(labels) == SKIP_PAIR:
        return colours, dict(VARIANT_LABELS), "skip vs no skip"
    return colours, {a: a, b: b}, f"{b} vs {a}"


def _smooth_log(y: np.ndarray, window: int) -> np.ndarray:
    """Rolling mean of log10(norm) over finite, non-zero points; NaN where none."""
    logs = np.where((y > 0) & np.isfinite(y), np.log10(np.where(y > 0, y, 1.0)), np.nan)
    ok = ~np.isnan(logs)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, logs, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return 10.0 ** (sums / counts)


def comparison_norms(histories, layers: Sequence[str], model: str, note: str | None = None,
                     quantity: str = "dLoss/d(output)"):
    colours, legend, vs = pair_style(list(histories))
    """One panel per layer, both variants overlaid: raw values faint, a smoothed line on top.

    ``histories``: {variant: DataFrame(step, layer, norm)}. ``note``: a second title line
    (the compare step says which layers were drawn when it capped the panels). ``quantity``:
    what the norms are of, for the title.
    """
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 2.3 * len(layers) + 0.8),
                             sharex=True, squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        for variant, history in histories.items():
            h = history[history["layer"] == layer].sort_values("step")
            x, y = h["step"].to_numpy(), h["norm"].to_numpy(dtype=np.float64)
            colour = colours[variant]
            shown = np.where((y > 0) & np.isfinite(y), y, np.nan)
            ax.plot(x, shown, lw=0.5, alpha=0.25, color=colour)
            window = max(1, len(y) // 100)
            zero = (y == 0).mean() if len(y) else 0.0
            label = legend[variant] + (f" ({zero:.0%} zero)" if zero else "")
            ax.plot(x, _smooth_log(y, window), lw=1.6, color=colour, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("norm")
        ax.set_title(layer, loc="left", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("batch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Gradient norms {quantity} - {model}, {vs} (faint: raw; "
                 "line: rolling mean of log10)" + (f"\n{note}" if note else ""), fontsize=11)
    # tight_layout makes room for one suptitle line only: reserve the note's line (~0.2 in).
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 / fig.get_size_inches()[1] if note else 0)))
    return fig


def depth_profile(table, model: str, quantity: str = "dLoss/d(layer output)",
                  labels: Sequence[str] = SKIP_PAIR):
    """Median norm per layer against depth, 10-90% band, one line per compared run.

    ``table``: the compare summary (columns depth, layer, variant, median, p10, p90), its
    ``variant`` one of ``labels``. ``quantity``: what the norms are of, for the y label.
    """
    colours, legend, _ = pair_style(labels)
    fig, ax = plt.subplots(figsize=(9, 5))
    for variant in labels:
        rows = table[table["variant"] == variant].sort_values("depth")
        colour = colours[variant]
        x = rows["depth"].to_numpy()
        floor = lambda v: np.where(v > 0, v, np.nan)  # noqa: E731 - zeros cannot sit on log axes
        ax.fill_between(x, floor(rows["p10"].to_numpy()), floor(rows["p90"].to_numpy()),
                        color=colour, alpha=0.2, lw=0)
        ax.plot(x, floor(rows["median"].to_numpy()), marker="o", color=colour,
                label=legend[variant] + " (median, 10-90% band)")
    layers = table.sort_values("depth").drop_duplicates("depth")
    if len(layers) <= 12:
        ax.set_xticks(layers["depth"].to_numpy(), layers["layer"].tolist(), rotation=30, ha="right")
    else:  # layers=all: 50+ names; as depth_profile_at_steps, at most 40 of them, the head too
        fig.set_size_inches(max(9, 0.18 * len(layers) + 3), 5.5)
        keep = np.unique(np.append(np.arange(0, len(layers), int(np.ceil(len(layers) / 40))),
                                   len(layers) - 1))
        ax.set_xticks(layers["depth"].to_numpy()[keep], layers["layer"].to_numpy()[keep].tolist(),
                      rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("probed layer, input side first")
    ax.set_ylabel(f"L2 norm of {quantity}")
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
                  batches_per_epoch: int | None = None, quantity: str = "dLoss/d(output)"):
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
        bar.set_label(f"log10 L2 norm of {quantity}; black = exactly zero "
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


# At most this many step columns in the difference heatmap: about one per pixel of a 12-inch
# figure at 100 dpi. A full default run (31,250 steps) is averaged 53 steps to a column; the
# cost is one log10 over both runs' arrays (2 x 1.7M values) and one reduceat: under a second
# with 54 layers on a 2-core CPU, and the figure draws 54 x 590 cells, not 1.7M.
DIFFERENCE_MAX_COLUMNS = 600


@dataclass
class Difference:
    """log10(second run's norm) - log10(first's) (skip minus noskip) over the layers and
    steps both runs have."""
    layers: list[str]       # shared layers, in the noskip run's forward order
    edges: np.ndarray       # [C + 1] step edges: column c covers steps edges[c] <= s < edges[c+1]
    diff: np.ndarray        # [L, C] mean over the column's shared steps of the per-step difference
    per_column: int         # shared steps averaged into one column (the last may have fewer)
    steps: int              # shared steps in all
    floor: float            # log10 value that zeros (and non-finite norms) were set to
    floored: dict           # {label: n}: values floored, per run (first, second)
    labels: tuple = SKIP_PAIR


def difference_matrix(noskip: Mapping[str, np.ndarray], skip: Mapping[str, np.ndarray],
                      layers: Sequence[str] | None = None,
                      max_columns: int = DIFFERENCE_MAX_COLUMNS,
                      key: str = "norms", labels: Sequence[str] = SKIP_PAIR) -> Difference | None:
    """The difference heatmap's data from two ``norms.npz`` dicts (steps, layers, and the
    [S, L] array ``key``: ``norms``, or ``weight_norms`` for weight-gradient norms).

    Both runs are floored together, as ``_log10_floor`` does for one run: a zero (dead ReLU)
    or a non-finite norm becomes one decade below the smallest positive norm of either run,
    so it reads as "at least that many decades smaller", never -inf. Steps are binned into
    at most ``max_columns`` columns of equal step count, each the mean of its steps'
    differences (the log of the geometric mean ratio). ``layers`` restricts the rows.
    Returns None when the runs share no layer or no step.
    """
    names_a = [str(x) for x in noskip["layers"]]
    names_b = [str(x) for x in skip["layers"]]
    shared = [x for x in names_a if x in names_b and (layers is None or x in layers)]
    steps, rows_a, rows_b = np.intersect1d(np.asarray(noskip["steps"]), np.asarray(skip["steps"]),
                                           assume_unique=True, return_indices=True)
    if not shared or not len(steps):
        return None
    a = np.asarray(noskip[key], dtype=np.float64)[rows_a][:, [names_a.index(x) for x in shared]]
    b = np.asarray(skip[key], dtype=np.float64)[rows_b][:, [names_b.index(x) for x in shared]]
    logs, floor = _log10_floor(np.stack([a, b]))
    per = max(1, -(-len(steps) // max_columns))
    starts = np.arange(0, len(steps), per)
    counts = np.diff(np.append(starts, len(steps)))[:, None]
    diff = np.add.reduceat(logs[1] - logs[0], starts, axis=0) / counts
    edges = np.append(steps[starts], steps[-1] + 1).astype(np.int64)
    bad = lambda v: int((~((v > 0) & np.isfinite(v))).sum())  # noqa: E731
    return Difference(shared, edges, diff.T, per, len(steps), floor,
                      dict(zip(labels, (bad(a), bad(b)))), tuple(labels))


def difference_heatmap(d: Difference, model: str, batches_per_epoch: int | None = None,
                       quantity: str = "dLoss/d(output)"):
    """Heatmap of ``difference_matrix``: layers down (input at the top), steps across,
    diverging colours centred at 0 (blue: larger gradient with skips, as the other compare
    figures colour the skip variant; red: larger without). ``quantity``: what the norms are
    of, for the title."""
    L = len(d.layers)
    fig, ax = plt.subplots(figsize=(12, max(3.5, 0.16 * L + 2.4)))
    limit = max(1.0, float(np.ceil(np.abs(d.diff).max())))
    # pcolormesh, not imshow: columns follow the true step edges, gaps (a resumed run) included.
    mesh = ax.pcolormesh(d.edges - 0.5, np.arange(L + 1) - 0.5, d.diff, cmap="RdBu",
                         vmin=-limit, vmax=limit, shading="flat", rasterized=True)
    ax.set_ylim(L - 0.5, -0.5)
    bar = fig.colorbar(mesh, ax=ax)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    first, second = d.labels
    skip_pair = tuple(d.labels) == SKIP_PAIR
    bar.set_label(f"log10({second} norm) - log10({first} norm), decades\n(blue: larger "
                  + ("with skips)" if skip_pair else f"in {second})"))
    if batches_per_epoch:
        for b in range(int(d.edges[0]) // batches_per_epoch * batches_per_epoch
                       + batches_per_epoch, int(d.edges[-1]), batches_per_epoch):
            ax.axvline(b - 0.5, color="0.3", lw=0.6, alpha=0.6)
    ticks = np.arange(L)
    if L > 40:  # as gradient_flow: a readable subset of the names
        ticks = np.unique(np.append(ticks[::int(np.ceil(L / 40))], L - 1))
    ax.set_yticks(ticks, [d.layers[i] for i in ticks], fontsize=7)
    ax.set_xlabel("batch" + (f" (each column: the mean of {d.per_column} batches)"
                             if d.per_column > 1 else ""))
    ax.set_ylabel("layer (forward order: input at the top)")
    zeros = (f"zero or non-finite norms set to 1e{d.floor:g}, one decade below the smallest "
             f"positive norm of either run ({first}: {d.floored[first]:,}, {second}: "
             f"{d.floored[second]:,} values)" if any(d.floored.values())
             else "no zero norms in either run")
    vs = "skip vs no skip" if skip_pair else f"{second} vs {first}"
    ax.set_title(f"Gradient flow of {quantity}, {vs} - {model}: {L} shared "
                 f"layers x {d.steps:,} shared batches\n{zeros}", fontsize=10)
    fig.tight_layout()
    return fig


def profile_steps(steps) -> list[int]:
    """Row indices of the first step, 25%, 50% and the last (duplicates dropped)."""
    n = len(steps)
    return list(dict.fromkeys(min(n - 1, int(round(f * (n - 1)))) for f in (0, 0.25, 0.5, 1.0))) if n else []


def depth_profile_at_steps(steps, layers: Sequence[str], norms, title: str,
                           batches_per_epoch: int | None = None,
                           quantity: str = "dLoss/d(layer output)"):
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
    ticks = np.unique(np.append(ticks, len(layers) - 1)) if len(layers) else ticks  # the head too
    ax.set_xticks(ticks, [layers[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    if np.any((norms > 0) & np.isfinite(norms)):
        ax.set_yscale("log")
    ax.set_xlabel("layer, input side first")
    ax.set_ylabel(f"L2 norm of {quantity}")
    ax.set_title(f"Gradient norm against depth - {title}")
    ax.grid(True, axis="y", alpha=0.3)
    if len(steps):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def first_layer_vs_depth(table, title: str):
    """The sweep's figure: each network's median first-layer gradient norm against its depth.

    ``table``: one row per trained network (columns model, depth, skip, batch_norm, median,
    p10, p90). Colour: skip or not; line style and marker: BatchNorm or not. The ResNets of
    one (skip, batch_norm) are joined by a line; other models (vgg19) are lone points with
    their name. Bars: 10th-90th percentile of the steps. A zero median cannot sit on a log
    axis: it is an x on the bottom edge.
    """
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    groups = list(table.groupby(["skip", "batch_norm"], sort=True))
    # Up to four points share a depth: small shifts (in decades, the x axis is log) keep
    # their markers and bars apart.
    shifts = np.linspace(-0.012, 0.012, len(groups)) if len(groups) > 1 else [0.0]
    for shift, ((skip, batch_norm), rows) in zip(shifts, groups):
        variant = "skip" if skip else "noskip"
        colour = VARIANT_COLOURS[variant]
        style, marker = ("--", "s") if batch_norm else ("-", "o")
        label = f"{VARIANT_LABELS[variant]}, {'BatchNorm' if batch_norm else 'no BatchNorm'}"
        rows = rows.sort_values("depth")
        x = rows["depth"].to_numpy(dtype=np.float64) * 10.0 ** shift
        median = rows["median"].to_numpy(dtype=np.float64)
        p10, p90 = (rows[c].to_numpy(dtype=np.float64) for c in ("p10", "p90"))
        shown = np.where((median > 0) & np.isfinite(median), median, np.nan)
        joined = rows["model"].str.startswith("resnet").to_numpy()
        ax.plot(x[joined], shown[joined], ls=style, marker=marker, color=colour, label=label)
        ax.plot(x[~joined], shown[~joined], ls="none", marker=marker, ms=8, color=colour,
                label=None if joined.any() else label)
        bars = (p10 > 0) & (p90 > 0) & np.isfinite(p10) & np.isfinite(p90)
        ax.vlines(x[bars], p10[bars], p90[bars], color=colour, alpha=0.3, lw=3)
        zero = median == 0
        if zero.any():
            ax.plot(x[zero], np.zeros(zero.sum()), marker, mfc="none", color=colour, ms=9,
                    clip_on=False, transform=ax.get_xaxis_transform())
            ax.plot(x[zero], np.zeros(zero.sum()), "x", color=colour, clip_on=False,
                    transform=ax.get_xaxis_transform(),
                    label=f"{label}: median exactly 0 (dead)")
        # Every lone point gets its name: at depth 19, vgg19 sits among resnet18's points.
        for xi, yi, model in zip(x[~joined], shown[~joined], rows["model"][~joined]):
            if np.isfinite(yi):
                ax.annotate(model, (xi, yi), xytext=(8, 0), textcoords="offset points",
                            va="center", fontsize=8, color=colour)
            else:
                ax.annotate(model, (xi, 0), xycoords=ax.get_xaxis_transform(),
                            xytext=(7, 4), textcoords="offset points", fontsize=8, color=colour)
    ax.set_xscale("log")
    resnets = table[table["model"].str.startswith("resnet")].drop_duplicates("depth")
    ticks = (resnets if len(resnets) else table.drop_duplicates("depth")).sort_values("depth")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks["depth"].to_numpy(),
                  [f"{d}\n{m}" for d, m in zip(ticks["depth"], ticks["model"])])
    if len(table):
        ax.set_xlim(table["depth"].min() / 1.15, table["depth"].max() * 1.15)
    if np.any((table["median"] > 0) & np.isfinite(table["median"])):
        ax.set_yscale("log")
    ax.set_xlabel("depth (layers of the network)")
    ax.set_ylabel("median L2 norm of dLoss/d(first layer output)")
    ax.set_title(f"First-layer gradient norm against depth - {title}")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="bars: 10th-90th percentile of the steps",
              title_fontsize=8)
    fig.tight_layout()
    return fig
