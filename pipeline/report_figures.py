"""The report's Bokeh figures, and the downsampling that keeps report.html small (docs:
guide/run-logs.md, "report.html").

Each figure function takes plain numpy data and returns a Bokeh figure with hover readouts;
``report_html`` lays them out. Log axes cannot show 0, NaN or Inf, so exact zeros are drawn
as marks at a floor and NaN/Inf at a ceiling, with counts on hover. ``bucket`` cuts a series
into at most ``MAX_POINTS`` buckets of consecutive steps, each drawn as its median with a
min-max band; the exact values stay in the metrics and ``norms.npz``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from bokeh.core.properties import value
from bokeh.models import (ColorBar, ColumnDataSource, FactorRange, FixedTicker, HoverTool,
                          LinearColorMapper, Span, Whisker)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

# Buckets per drawn series: about one per pixel of a 1,100-pixel-wide chart.
MAX_POINTS = 1000
# Step columns of the layer x step heatmap (54 layers x 120 = 6,480 cells with layers=all).
HEATMAP_COLUMNS = 120

VARIANT_COLOURS = {"noskip": "#d62728", "skip": "#1f77b4"}   # plots.py's tab:red, tab:blue
VARIANT_LABELS = {"noskip": "without skips", "skip": "with skips"}
TOOLS = "pan,box_zoom,wheel_zoom,reset,save"


def _positive(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[(v > 0) & np.isfinite(v)]


def floor_ceiling(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    """Where zeros and NaN/Inf are drawn on a log axis: a decade beyond the data either way."""
    pos = [_positive(a) for a in arrays]
    pos = np.concatenate(pos) if pos else np.zeros(0)
    if not len(pos):
        return 1e-30, 1.0
    return (10.0 ** (math.floor(math.log10(pos.min())) - 1),
            10.0 ** (math.ceil(math.log10(pos.max())) + 1))


@dataclass
class Buckets:
    """One series cut into buckets of consecutive rows (equal counts, the last may be short)."""
    lo: np.ndarray        # int32 first step of each bucket
    hi: np.ndarray        # int32 last step
    x: np.ndarray         # float32 middle step: where the bucket is drawn
    med: np.ndarray       # float64 median of the positive finite values (NaN when none)
    mn: np.ndarray
    mx: np.ndarray
    zeros: np.ndarray     # int32 exact zeros in the bucket
    bad: np.ndarray       # int32 NaN/Inf in the bucket
    per: int              # rows per bucket

    def source(self, **extra) -> ColumnDataSource:
        return ColumnDataSource({"x": self.x, "lo": self.lo, "hi": self.hi, "med": self.med,
                                 "mn": self.mn, "mx": self.mx, **extra})


def bucket(steps, values, max_points: int = MAX_POINTS, keep_nonpositive: bool = False) -> Buckets:
    """Downsample one series for display. ``keep_nonpositive``: summarise every finite value
    (a loss), not only the positive ones (a norm on a log axis)."""
    steps = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    per = max(1, -(-n // max_points))
    k = -(-n // per) if n else 0
    pad = k * per - n
    good = np.isfinite(v) & (True if keep_nonpositive else v > 0)
    shown = np.concatenate([np.where(good, v, np.nan), np.full(pad, np.nan)]).reshape(k, per)
    with warnings.catch_warnings():  # all-NaN buckets (all zero, or all non-finite) give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med, mn, mx = (np.nanmedian(shown, axis=1), np.nanmin(shown, axis=1),
                       np.nanmax(shown, axis=1)) if k else (np.zeros(0),) * 3
    starts = np.arange(0, n, per)
    counts = lambda mask: (np.add.reduceat(mask.astype(np.int32), starts) if n  # noqa: E731
                           else np.zeros(0, np.int32)).astype(np.int32)
    lo = steps[starts] if n else np.zeros(0, np.int64)
    hi = steps[np.minimum(starts + per, n) - 1] if n else np.zeros(0, np.int64)
    return Buckets(lo.astype(np.int32), hi.astype(np.int32), ((lo + hi) / 2).astype(np.float32),
                   med, mn, mx, counts(v == 0), counts(~np.isfinite(v)), per)


# --- figures -------------------------------------------------------------------------------
def _figure(title: str, height: int = 380, y_log: bool = True, **kw):
    kw.setdefault("y_axis_type", "log" if y_log else "linear")
    # The page's width, whatever it is: MLflow's artifact viewer is ~560 px beside its
    # assistant panel, a browser tab ~1,100 (the page's max-width).
    p = figure(title=title, sizing_mode="stretch_width", height=height, tools=TOOLS, **kw)
    p.toolbar.logo = None  # the logo links to bokeh.org: nothing on the page points outside it
    p.title.text_font_size = "13px"
    return p


def _legend_outside(p) -> None:
    """The legend right of the plot, where it hides no data; click hides a series."""
    if p.legend:
        legend = p.legend[0]
        legend.click_policy, legend.label_text_font_size = "hide", "11px"
        p.add_layout(legend, "right")


def _epoch_lines(p, steps: np.ndarray, steps_per_epoch: int | None) -> None:
    if not steps_per_epoch or not len(steps):
        return
    first, last = int(steps.min()), int(steps.max())
    bounds = range((first // steps_per_epoch + 1) * steps_per_epoch, last + 1, steps_per_epoch)
    if len(bounds) <= 100:
        for b in bounds:
            p.add_layout(Span(location=b - 0.5, dimension="height", line_color="#bbbbbb",
                              line_width=1, line_dash="dotted"))


def time_figure(title: str, curves: Mapping[str, tuple], colours: Mapping[str, str],
                y_label: str, steps_per_epoch: int | None = None, y_log: bool = True,
                max_points: int = MAX_POINTS, height: int = 380, layer: str | None = None):
    """Each series over the steps, bucketed: median line and points, min-max band, zeros at
    the floor (▼) and NaN/Inf at the ceiling (×), all with hover readouts. The series are
    layers, or (``layer`` given) runs of that one layer."""
    p = _figure(title, height, y_log)
    p.xaxis.axis_label, p.yaxis.axis_label = "step (batch)", y_label
    series = {name: bucket(s, v, max_points, keep_nonpositive=not y_log)
              for name, (s, v) in curves.items()}
    floor, ceiling = floor_ceiling([b.mn for b in series.values()] + [b.mx for b in series.values()])
    if not y_log:
        top = [b.mx[np.isfinite(b.mx)] for b in series.values()]
        top = np.concatenate(top) if top else np.zeros(0)
        ceiling = float(top.max()) * 1.1 if len(top) else 1.0
    points, marks = [], []
    for name, b in series.items():
        colour = colours[name]
        src = b.source()
        # One legend_label for all of a series' renderers: a click on it hides them all.
        p.varea(x="x", y1="mn", y2="mx", source=src, fill_color=colour, fill_alpha=0.15,
                legend_label=name)
        p.line(x="x", y="med", source=src, line_color=colour, line_width=1.5, legend_label=name)
        points.append(p.scatter(x="x", y="med", source=src, size=3, color=colour, name=name,
                                legend_label=name))
        if y_log and b.zeros.any():
            z = b.zeros > 0
            marks.append(p.scatter(x="x", y=floor, marker="inverted_triangle", size=8,
                                   color=colour, name=name, legend_label=name, source=ColumnDataSource(
                                       {"x": b.x[z], "lo": b.lo[z], "hi": b.hi[z],
                                        "n": b.zeros[z]})))
        if b.bad.any():
            z = b.bad > 0
            marks.append(p.scatter(x="x", y=ceiling, marker="x", size=9, line_width=2,
                                   color=colour, name=name, legend_label=name, source=ColumnDataSource(
                                       {"x": b.x[z], "lo": b.lo[z], "hi": b.hi[z],
                                        "n": b.bad[z]})))
    per = max((b.per for b in series.values()), default=1)
    at = ("step", "@lo") if per == 1 else ("steps", "@lo to @hi")
    fmt = {f"@{c}": "printf" for c in ("med", "mn", "mx")}
    value = [("value", "@med{%.4g}")] if per == 1 else [
        ("median", "@med{%.4g}"), ("min to max", "@mn{%.3g} to @mx{%.3g}")]
    # limit=1: ~1 bucket per pixel, so the cursor covers several; one readout, not a stack.
    who = [("layer", "$name")] if layer is None else [("layer", layer), ("run", "$name")]
    p.add_tools(HoverTool(renderers=points, tooltips=[*who, at, *value],
                          formatters=fmt, mode="mouse", limit=1))
    if marks:
        p.add_tools(HoverTool(renderers=[m for m in marks if m.glyph.marker == "inverted_triangle"],
                              tooltips=[*who, at, ("exact zeros", "@n"),
                                        ("drawn at", f"{floor:.0e} (the floor)")], limit=1))
        p.add_tools(HoverTool(renderers=[m for m in marks if m.glyph.marker == "x"],
                              tooltips=[*who, at, ("NaN/Inf values", "@n"),
                                        ("drawn at", f"{ceiling:.3g} (the ceiling)")], limit=1))
    all_steps = [np.asarray(s) for s, _ in curves.values()]
    _epoch_lines(p, np.concatenate(all_steps) if all_steps else np.zeros(0), steps_per_epoch)
    _legend_outside(p)
    return p, floor, ceiling, per


def heatmap_figure(title: str, steps, layers: Sequence[str], norms, steps_per_epoch=None,
                   columns: int = HEATMAP_COLUMNS):
    """log10(norm): one row per layer (input at the top), one cell per bucket of steps; the
    cell is the bucket's median positive norm, black where every value in it is zero."""
    steps = np.asarray(steps)
    table = np.asarray(norms, dtype=np.float64).reshape(len(steps), len(layers))
    cols = [bucket(steps, table[:, i], columns) for i in range(len(layers))]
    floor, _ = floor_ceiling([c.mn for c in cols])
    p = _figure(title, max(260, 16 * len(layers) + 110), y_log=False, y_axis_type="auto",
                y_range=FactorRange(*reversed([str(x) for x in layers])))
    p.xaxis.axis_label = "step (batch)"
    logs = np.concatenate([np.log10(c.med) for c in cols]) if cols else np.zeros(0)
    finite = logs[np.isfinite(logs)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (-1.0, 0.0)
    mapper = LinearColorMapper(palette=Viridis256, low=low, high=max(high, low + 1e-9),
                               low_color="black", nan_color="#dddddd")
    rects = []
    for layer, c in zip(layers, cols):
        allzero = (c.zeros > 0) & ~np.isfinite(c.med)
        src = c.source(v=np.where(allzero, floor, c.med),
                       c=np.where(allzero, -np.inf, np.log10(np.where(c.med > 0, c.med, 1))),
                       n=c.zeros)
        src.data["c"][~np.isfinite(c.med) & ~allzero] = np.nan
        width = float(max(c.per, 1))
        rects.append(p.rect(x="x", y=value(str(layer)), width=width, height=1, source=src,
                            fill_color={"field": "c", "transform": mapper}, line_color=None,
                            name=str(layer)))
    p.add_tools(HoverTool(renderers=rects, tooltips=[
        ("layer", "$name"), ("steps", "@lo to @hi"), ("median", "@med{%.3g}"),
        ("exact zeros", "@n")], formatters={"@med": "printf"}))
    p.add_layout(ColorBar(color_mapper=mapper, title="log10 norm (black: all zero)",
                          width=12), "right")
    p.yaxis.major_label_text_font_size = "9px" if len(layers) > 20 else "11px"
    _epoch_lines(p, steps, steps_per_epoch)
    return p, floor


def _edge_marks(p, x: str, data: Mapping[str, Sequence], med: np.ndarray, floor: float,
                ceiling: float, size: int, **style) -> list:
    """A median that is exactly 0 as ▼ at the floor, a NaN/Inf one as × at the ceiling: rows
    of ``data`` (one source's columns), drawn at ``x``; their renderers, for hover."""
    out = []
    for mask, y, marker in ((med == 0, floor, "inverted_triangle"),
                            (~np.isfinite(med), ceiling, "x")):
        if mask.any():
            rows = {k: [v for v, m in zip(col, mask) if m] for k, col in data.items()}
            out.append(p.scatter(x=x, y=y, marker=marker, size=size, line_width=2,
                                 source=ColumnDataSource(rows), **style))
    return out


def depth_figure(title: str, layers: Sequence[str], rows: Mapping[str, Sequence[Mapping]],
                 colours: Mapping[str, str], y_label: str):
    """Median norm against depth (layers in forward order), p10-p90 band, early/late medians
    dashed; one series per key of ``rows`` ({series: [stats row per layer]})."""
    layers = [str(x) for x in layers]
    p = _figure(title, 420, x_range=FactorRange(*layers))
    p.yaxis.axis_label = y_label
    p.xaxis.major_label_orientation = 1.0 if len(layers) > 6 else 0
    p.xaxis.major_label_text_font_size = "9px" if len(layers) > 20 else "11px"
    values = [np.array([r.get(k, math.nan) for r in rs], dtype=np.float64)
              for rs in rows.values() for k in ("median", "p10", "p90")]
    floor, ceiling = floor_ceiling(values)
    points = []
    for name, rs in rows.items():
        col = lambda k: np.array([float(r.get(k, math.nan)) for r in rs])  # noqa: E731
        med = col("median")
        pos = lambda a: np.where((a > 0) & np.isfinite(a), a, np.nan)  # noqa: E731
        src = ColumnDataSource({"layer": [str(r["layer"]) for r in rs], "med": pos(med),
                                "raw": med, "p10": pos(col("p10")), "p90": pos(col("p90")),
                                "early": pos(col("early_median")), "late": pos(col("late_median")),
                                "zero": col("zero_fraction") * 100,
                                "status": [str(r.get("status", "-")) for r in rs]})
        colour = colours[name]
        p.varea(x="layer", y1="p10", y2="p90", source=src, fill_color=colour, fill_alpha=0.15,
                legend_label=name)
        p.line(x="layer", y="med", source=src, color=colour, line_width=2, legend_label=name)
        p.line(x="layer", y="early", source=src, color=colour, line_dash="dashed", alpha=0.6,
               legend_label=f"{name}: first/last tenth of the steps")
        p.line(x="layer", y="late", source=src, color=colour, line_dash="dotted", alpha=0.6,
               legend_label=f"{name}: first/last tenth of the steps")
        points.append(p.scatter(x="layer", y="med", source=src, size=7, color=colour, name=name,
                                legend_label=name))
        points += _edge_marks(p, "layer", src.data, med, floor, ceiling, 10, color=colour,
                              name=name, legend_label=name)
    p.add_tools(HoverTool(renderers=points, tooltips=[
        ("run", "$name"), ("layer", "@layer"), ("median", "@raw{%.3g}"),
        ("p10 to p90", "@p10{%.3g} to @p90{%.3g}"), ("zero steps", "@zero{%.0f}%"),
        ("status", "@status")], formatters={f"@{c}": "printf" for c in ("raw", "p10", "p90", "zero")}))
    _legend_outside(p)
    return p, floor, ceiling


def sweep_figure(cells: Sequence[Mapping]):
    """The sweep's first-layer median against depth (log-log), p10-p90 whiskers; one line per
    (skip, batch_norm); a zero median at the floor (▼), a NaN/Inf one at the ceiling (×)."""
    p = _figure("First-layer gradient norm against depth", 460, x_axis_type="log")
    p.xaxis.axis_label = "depth (layers of the network)"
    p.yaxis.axis_label = "median L2 norm of dLoss/d(first layer output)"
    floor, ceiling = floor_ceiling([np.array([float(c.get(k, math.nan)) for c in cells])
                                    for k in ("median", "p10", "p90")])
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault((bool(c.get("skip")), bool(c.get("batch_norm"))), []).append(c)
    points = []
    for (skip, bn), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: float(r["depth"]))
        col = lambda k: np.array([float(r.get(k, math.nan)) for r in rows])  # noqa: E731
        med = col("median")
        ok = (med > 0) & np.isfinite(med)
        label = f"{VARIANT_LABELS['skip' if skip else 'noskip']}, {'BatchNorm' if bn else 'no BatchNorm'}"
        data = {"depth": col("depth"), "med": np.where(ok, med, np.nan), "raw": med,
                "p10": col("p10"), "p90": col("p90"),
                "cell": [str(r.get("cell", r.get("model"))) for r in rows],
                "health": [str(r.get("health") or "-") for r in rows],
                "zero": col("zero_fraction") * 100, "acc": col("test_accuracy")}
        src = ColumnDataSource(data)
        colour = VARIANT_COLOURS["skip" if skip else "noskip"]
        resnet = [str(r.get("model", "")).startswith("resnet") for r in rows]
        if sum(resnet) > 1:
            p.line(x="depth", y="med", line_dash="dashed" if bn else "solid", color=colour,
                   legend_label=label, source=ColumnDataSource(
                       {k: [v for v, keep in zip(data[k], resnet) if keep] for k in ("depth", "med")}))
        points.append(p.scatter(x="depth", y="med", source=src, size=9, color=colour,
                                marker="square" if bn else "circle", legend_label=label))
        bars = (col("p10") > 0) & (col("p90") > 0) & np.isfinite(col("p10") * col("p90"))
        if bars.any():
            p.add_layout(Whisker(base="depth", lower="p10", upper="p90", line_color=colour,
                                 line_alpha=0.5, source=ColumnDataSource(
                                     {k: data[k][bars] for k in ("depth", "p10", "p90")})))
        points += _edge_marks(p, "depth", data, med, floor, ceiling, 11, color=colour,
                              legend_label=label)
    ticks = sorted({(int(c["depth"]), str(c.get("model", ""))) for c in cells
                    if str(c.get("model", "")).startswith("resnet")} or
                   {(int(c["depth"]), str(c.get("model", ""))) for c in cells})
    p.xaxis.ticker = FixedTicker(ticks=[d for d, _ in ticks])
    p.xaxis.major_label_overrides = {d: f"{d}\n{m}" for d, m in ticks}
    p.add_tools(HoverTool(renderers=points, tooltips=[
        ("cell", "@cell"), ("depth", "@depth{0}"), ("median", "@raw{%.3g}"),
        ("p10 to p90", "@p10{%.3g} to @p90{%.3g}"), ("zero steps", "@zero{%.0f}%"),
        ("health", "@health"), ("test accuracy", "@acc{%.3f}")],
        formatters={f"@{c}": "printf" for c in ("raw", "p10", "p90", "zero", "acc")}))
    _legend_outside(p)
    return p, floor, ceiling
