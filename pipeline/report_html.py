"""report.html: one self-contained page (the answer, log-axis figures with hover, tables)
from plain data (docs: guide/run-logs.md, "report.html").

``training_report``, ``compare_report`` and ``sweep_report`` take what a run already holds
(numpy arrays, tags, table rows) and return the page as a string; the caller logs it as
``names.REPORT_HTML``. MLflow's artifact viewer shows HTML in a sandboxed iframe with no
network and no sibling artifacts (mlflow#2139), so scripts, styles and data are all inline.
Bokeh, because its inline JS and base64 arrays made the smallest such page of the libraries
measured (the docs page has the figures).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from bokeh.palettes import Category10_10

from . import names
from .report_figures import (HEATMAP_COLUMNS, MAX_POINTS, VARIANT_COLOURS, VARIANT_LABELS,
                             depth_figure, heatmap_figure, sweep_figure, time_figure)

from .report_page import (Figure, decades_or_none, downsample_note,
                          fmt, has, is_bad, is_zero, marks_note, md, page, pct, pick_layers,
                          as_rows, series_stats, html_table)


# --- a training run ------------------------------------------------------------------------
def _training_headline(tags: Mapping[str, str], layers: list[str], stats: dict,
                       statuses: Mapping[str, str], blowup: tuple[int, int] | None) -> str:
    """The answer, from the diagnosis tags and the record's medians (HTML)."""
    health = tags.get(names.HEALTH_TAG, "unknown")
    if not layers:
        return "No gradient record: this run logged no gradient norms."
    first, head = layers[0], layers[-1]
    c = lambda x: f"<code>{html.escape(x)}</code>"  # noqa: E731
    med = lambda x: fmt(stats[x]["median"])  # noqa: E731

    def versus(layer: str) -> str:
        d = decades_or_none(stats[layer]["median"], stats[head]["median"])
        if d is None or layer == head:
            return ""
        return f", {abs(d):.1f} decades {'below' if d < 0 else 'above'} {c(head)} ({med(head)})"

    if health == "vanishing":
        layer = tags.get(names.FIRST_VANISHING_TAG, first)
        layer = layer if layer in stats else first
        said = html.escape(statuses.get(layer, "Vanishing"))
        out = f"The gradient vanishes: {c(layer)} is {said} (median {med(layer)}){versus(layer)}."
        if layer != first:
            out += f" The input side, {c(first)}: {med(first)}."
        return out
    if health == "dead":
        share = tags.get(names.ZERO_STEP_FRACTION_TAG, "?")
        try:
            share = f"{float(share):.0%}"
        except ValueError:
            pass
        return (f"The network died: every layer below {c(head)} had exactly zero gradient on "
                f"{html.escape(share)} of the steps.")
    if health == "exploding" and blowup is not None:
        step, count = blowup
        return (f"The gradient blew up: {count:,} NaN/Inf norms, the first at step {step:,}. "
                f"Before that, {c(first)} had median {med(first)}{versus(first)}.")
    if health == "exploding":
        hot = [x for x in layers if statuses.get(x) == "Exploding"] or [
            max(layers, key=lambda x: stats[x]["median"] if math.isfinite(stats[x]["median"])
                else math.inf)]
        return f"The gradient explodes: {c(hot[0])} is Exploding (median {med(hot[0])}){versus(hot[0])}."
    if health == "healthy":
        return (f"Healthy, no layer vanishes: {c(first)} is "
                f"{html.escape(statuses.get(first, 'Healthy'))} (median {med(first)}){versus(first)}.")
    return (f"No diagnosis (the rules read output-gradient norms): {c(first)} has median "
            f"{med(first)}{versus(first)}.")


def _training_points(tags: Mapping[str, str], layers: list[str], bad: int,
                     bad_loss: int) -> list[str]:
    """The diagnosis list: the tags in words, and the NaN/Inf counts (HTML)."""
    points = [f"Health: <strong>{html.escape(tags.get(names.HEALTH_TAG, 'unknown'))}</strong> "
              f"(tag <code>{names.HEALTH_TAG}</code>)."]
    if names.FIRST_VANISHING_TAG in tags:
        points.append(f"First vanishing layer, from the head down: "
                      f"<code>{html.escape(tags[names.FIRST_VANISHING_TAG])}</code>.")
    if names.FIRST_TO_LAST_TAG in tags and layers:
        points.append(f"Median <code>{html.escape(layers[0])}</code> / median "
                      f"<code>{html.escape(layers[-1])}</code>: "
                      f"{html.escape(tags[names.FIRST_TO_LAST_TAG])}.")
    if names.ZERO_STEP_FRACTION_TAG in tags:
        points.append(f"Steps with every layer below the head at exactly zero: "
                      f"{html.escape(tags[names.ZERO_STEP_FRACTION_TAG])}.")
    if names.AT_CHANCE_TAG in tags:
        points.append("The loss ended at chance level (a uniform guess): the network did not "
                      "learn." if tags[names.AT_CHANCE_TAG] == "true" else
                      "The loss ended away from chance level (a uniform guess's).")
    if bad or bad_loss:
        points.append(f"<strong>Non-finite values</strong>: {bad:,} NaN/Inf norms and "
                      f"{bad_loss:,} NaN/Inf losses; the statistics below use the finite ones.")
    return points


def training_report(record: Mapping[str, np.ndarray], tags: Mapping[str, str], *,
                    run_name: str, run_id: str, model: str, skip: bool | None,
                    params: Mapping[str, object] | None = None,
                    test_accuracy: float | None = None, steps_per_epoch: int | None = None,
                    every_step: Sequence[str] | None = None,
                    statuses: Mapping[str, str] | None = None) -> str:
    """The page of one training run.

    ``record``: the dense record, norms.npz's arrays (schema: docs guide/run-logs.md):
    steps [S], layers [L] in forward order, loss [S], norms [S, L] and/or weight_norms [S, L].
    ``tags``: ``health.diagnose``'s tags (``{"gradient.health": "unknown"}`` without
    output norms). ``params``: the run's params, shown in a folded table. ``every_step``: the
    layers logged as metrics every step (the ``layers.every_step`` tag), drawn over time; the
    heatmap and depth profile draw every layer. ``statuses``: {layer: status} by ``health``'s
    rule (the per-layer statuses ``diagnose`` derives), a table column when given.
    """
    statuses = dict(statuses or {})
    layers = [str(x) for x in record.get("layers", [])]
    steps = np.asarray(record.get("steps", np.zeros(0)), dtype=np.int64)
    key = "norms" if "norms" in record else "weight_norms" if "weight_norms" in record else None
    label = {"norms": "dLoss/d(layer output)", "weight_norms": "dLoss/d(layer weights)"}
    table = (np.asarray(record[key], dtype=np.float64).reshape(len(steps), len(layers))
             if key else np.zeros((len(steps), 0)))
    if not key:
        layers = []
    stats = {x: series_stats(table[:, i]) for i, x in enumerate(layers)}
    variant = "" if skip is None else "skip" if skip else "noskip"
    title = f"{run_name}: gradient flow"
    meta = " · ".join(html.escape(str(x)) for x in (
        f"run {run_name}", f"ID {run_id}", f"model {model}",
        {"skip": "with skip connections", "noskip": "without skip connections"}.get(variant, ""),
        f"test accuracy {fmt(test_accuracy)}" if test_accuracy is not None else "",
        f"{len(steps):,} steps" + (f" ({steps_per_epoch:,} per epoch)" if steps_per_epoch else ""))
        if x)

    bad = int(sum(x["nonfinite"] for x in stats.values()))
    loss = np.asarray(record.get("loss", np.zeros(0)), dtype=np.float64)
    bad_loss = int((~np.isfinite(loss)).sum())
    points = _training_points(tags, layers, bad, bad_loss)

    figures = []
    if key:
        shown = [x for x in (every_step or pick_layers(layers)) if x in stats] or pick_layers(layers)
        colours = {x: Category10_10[i % 10] for i, x in enumerate(shown)}
        curves = {x: (steps, table[:, layers.index(x)]) for x in shown}
        fig, floor, ceiling, per = time_figure(
            f"L2 norm of {label[key]} per layer (log axis)", curves, colours,
            f"L2 norm of {label[key]}", steps_per_epoch)
        note = downsample_note(len(steps), per, floor, ceiling, has(curves, is_zero), has(curves, is_bad))
        if len(shown) < len(layers):
            note = (f"{len(shown)} of the {len(layers)} probed layers (those logged every step); "
                    "the heatmap and the depth profile below show all of them. " + note)
        figures.append(Figure("Gradient norms over training", note, fig))
        if len(layers) > 1:
            heat, _ = heatmap_figure(f"log10 L2 norm of {label[key]}: layer x step",
                                          steps, layers, table, steps_per_epoch)
            figures.append(Figure(
                "Gradient flow: every layer, every step", "Each cell is the median of "
                f"{max(1, -(-len(steps) // HEATMAP_COLUMNS)):,} steps; black: all of them "
                "exactly zero; grey: all NaN/Inf. Input side at the top.", heat))
        rows = [{"layer": x, **stats[x], "status": statuses.get(x, "-")} for x in layers]
        depth, floor, ceiling = depth_figure(
            f"Median L2 norm of {label[key]} against depth", layers, {variant or "run": rows},
            {variant or "run": VARIANT_COLOURS.get(variant, "#333333")}, f"L2 norm of {label[key]}")
        figures.append(Figure("Gradient against depth", "Median over all steps, the band "
                               "the 10th to 90th percentile; dashed and dotted: the first and "
                               "last tenth of the steps. " + marks_note(rows, floor, ceiling),
                               depth))
    if key == "norms" and "weight_norms" in record:
        w = np.asarray(record["weight_norms"], dtype=np.float64).reshape(len(steps), len(layers))
        shown_w = [x for x in (every_step or pick_layers(layers)) if x in stats] or pick_layers(layers)
        curves = {x: (steps, w[:, layers.index(x)]) for x in shown_w}
        fig, floor, ceiling, per = time_figure(
            "L2 norm of dLoss/d(layer weights) per layer (log axis)", curves,
            {x: Category10_10[i % 10] for i, x in enumerate(shown_w)},
            "L2 norm of dLoss/d(layer weights)", steps_per_epoch)
        figures.append(Figure("Weight-gradient norms over training", downsample_note(
            len(steps), per, floor, ceiling, has(curves, is_zero), has(curves, is_bad)), fig))
    if len(loss):
        fig, _, ceiling, per = time_figure("Training loss", {"loss": (steps, loss)},
                                           {"loss": "#444444"}, "loss", steps_per_epoch,
                                           y_log=False, height=280)
        fig.legend.visible = False
        figures.append(Figure("Training loss", downsample_note(
            len(loss), per, None, ceiling, False, bool(bad_loss)).replace(
                " positive values", " values"), fig))

    tables = []
    if layers:
        head = stats[layers[-1]]["median"]
        tables.append("<h2>Per layer</h2>" + html_table(
            ["depth", "layer", "median", "p10", "p90", "min", "max", "early", "late",
             "zero steps", "NaN/Inf", f"decades vs {layers[-1]}", "status"],
            [[i, x, fmt(s["median"]), fmt(s["p10"]), fmt(s["p90"]), fmt(s["min"]), fmt(s["max"]),
              fmt(s["early_median"]), fmt(s["late_median"]), pct(s["zero_fraction"]),
              s["nonfinite"], ("-" if (d := decades_or_none(s["median"], head)) is None
                               else f"{d:+.1f}"), statuses.get(x, "-")]
             for i, (x, s) in enumerate(stats.items())],
            numeric=range(2, 12), status=(12,), table_id="layers")
            + '<p class="note">Statistics of the finite values over every step; early/late: '
              "medians of the first and last tenth of the steps; status by the compare rule "
              "(a layer's median relative to the output-side layer's).</p>")
    if params:
        tables.append("<details><summary>Parameters</summary>" + html_table(
            ["param", "value"], sorted((str(k), str(v)) for k, v in params.items()))
            + "</details>")
    blowup = None
    if bad:
        rows = np.flatnonzero((~np.isfinite(table)).any(axis=1))
        blowup = (int(steps[rows[0]]), bad)
    return page("training run", title, _training_headline(tags, layers, stats, statuses, blowup),
                 meta, points, figures, tables)


# --- the compare run -----------------------------------------------------------------------
@dataclass
class ComparePart:
    """One quantity's comparison, as ``compare.Part`` holds it (plain data).

    ``table``: the summary rows (``compare.summarize``'s first frame, or its ``_records``):
    depth, layer, variant, run_id, median, min, max, first, last, p10, p90, early_median,
    late_median, zero_fraction, status, skip_over_noskip. ``curves``: {variant: {layer:
    (steps, values)}}, from each run's history or ``curves_from_record(norms.npz dict)``.
    ``diagnosis``: ``compare.diagnosis`` lines (markdown). ``per_epoch``: the per-epoch rows
    (layer, variant, epoch, median, zero_fraction, status). ``label``: what the norms are of.
    """
    table: object
    curves: Mapping[str, Mapping[str, tuple]]
    diagnosis: Sequence[str] = ()
    per_epoch: object = ()
    label: str = "dLoss/d(layer output)"
    heading: str = "Gradient norms"


SKIP_PAIR = ("noskip", "skip")


def pair_colours(labels: Sequence[str]) -> dict[str, str]:
    """The compared runs' colours, by position: the first red, the second blue."""
    return dict(zip(labels, (VARIANT_COLOURS["noskip"], VARIANT_COLOURS["skip"])))


def _ratio_column(labels: Sequence[str]) -> str:
    return "skip_over_noskip" if tuple(labels) == SKIP_PAIR else "second_over_first"


def _compare_headline(rows: list[dict], labels: Sequence[str] = SKIP_PAIR) -> str:
    """``conv1 is Vanishing without skips (median 2.4e-21) and Healthy with them (4.1e-08):
    13.2 decades apart.`` for the input-side layer (any other pair in its labels' words)."""
    if not rows:
        return "No layer to compare."
    depth = min(int(r["depth"]) for r in rows)
    first = {r["variant"]: r for r in rows if int(r["depth"]) == depth}
    a, b = labels
    n, s = first.get(a), first.get(b)
    if n is None or s is None:
        return f"The comparison needs both a {html.escape(a)} and a {html.escape(b)} run."
    layer = html.escape(str(n["layer"]))
    d = decades_or_none(s["median"], n["median"])
    skip_pair = tuple(labels) == SKIP_PAIR
    lower = "lower with skips" if skip_pair else f"lower in {html.escape(b)}"
    gap = ("" if d is None else f": {abs(d):.1f} decades apart" if d > 0 else
           f": {abs(d):.1f} decades {lower}")
    zero = lambda r: " (median exactly 0)" if float(r["median"]) == 0 else ""  # noqa: E731
    where_a, where_b = (("without skips", "with them") if skip_pair
                        else (f"in {html.escape(a)}", f"in {html.escape(b)}"))
    return (f"<code>{layer}</code> is {html.escape(str(n['status']))} {where_a} (median "
            f"{fmt(n['median'])}{zero(n)}) and {html.escape(str(s['status']))} {where_b} "
            f"({fmt(s['median'])}{zero(s)}){gap}.")


def _compare_figures(part: ComparePart, rows: list[dict], steps_per_epoch: int | None,
                     max_points: int, labels: Sequence[str] = SKIP_PAIR) -> list[Figure]:
    figures = []
    colours = pair_colours(labels)
    layers = list(dict.fromkeys(str(r["layer"]) for r in sorted(rows, key=lambda r: int(r["depth"]))))
    panels = pick_layers(layers)
    for layer in panels:
        curves = {v: part.curves[v][layer] for v in labels if layer in part.curves.get(v, {})}
        if not curves:
            continue
        fig, floor, ceiling, per = time_figure(
            f"{layer}: L2 norm of {part.label} (log axis)", curves,
            {v: colours[v] for v in curves}, "L2 norm", steps_per_epoch,
            max_points=max_points, height=300, layer=layer)
        steps = max(len(c[0]) for c in curves.values())
        figures.append(Figure(f"{part.heading}: {layer}", downsample_note(
            steps, per, floor, ceiling, has(curves, is_zero), has(curves, is_bad)), fig))
    if len(panels) < len(layers):
        figures[0].note = (f"{len(panels)} of the {len(layers)} compared layers, evenly across "
                           "depth; the depth profile and the tables have all of them. "
                           + figures[0].note) if figures else ""
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in labels}
    for v in by_variant:
        by_variant[v].sort(key=lambda r: int(r["depth"]))
    depth, floor, ceiling = depth_figure(f"Median L2 norm of {part.label} against depth", layers,
                                         {v: rs for v, rs in by_variant.items() if rs},
                                         colours, f"L2 norm of {part.label}")
    which = ("red without skips, blue with" if tuple(labels) == SKIP_PAIR
             else f"red: {labels[0]}, blue: {labels[1]}")
    figures.append(Figure(f"{part.heading} against depth", "Median over the steps, the band "
                           "the 10th to 90th percentile, dashed and dotted: the first and last "
                           f"tenth of the steps; {which}. "
                           + marks_note(rows, floor, ceiling), depth))
    return figures


def _compare_tables(part: ComparePart, rows: list[dict],
                    labels: Sequence[str] = SKIP_PAIR) -> list[str]:
    ratio = _ratio_column(labels)
    out = [f"<h2>{html.escape(part.heading)}: per layer</h2>" + html_table(
        ["layer", "variant", "median", "min", "max", "first", "last", "early", "late",
         "zero steps", "skip/noskip" if ratio == "skip_over_noskip" else
         f"{labels[1]}/{labels[0]}", "status"],
        [[r["layer"], r["variant"], fmt(r.get("median")), fmt(r.get("min")), fmt(r.get("max")),
          fmt(r.get("first")), fmt(r.get("last")), fmt(r.get("early_median")),
          fmt(r.get("late_median")), pct(r.get("zero_fraction")),
          fmt(r.get(ratio)), r.get("status")] for r in rows],
        numeric=range(2, 11), status=(11,), table_id="summary")]
    epochs_rows = as_rows(part.per_epoch)
    if epochs_rows:
        epochs = sorted({int(r["epoch"]) for r in epochs_rows})
        cells: dict[tuple, dict] = {}
        for r in epochs_rows:
            cells.setdefault((str(r["layer"]), str(r["variant"])), {})[int(r["epoch"])] = (
                f"{fmt(r['median'])} ({r['status']})")
        out.append("<h2>Per epoch: median norm (status)</h2>" + html_table(
            ["layer", "variant", *(f"epoch {e + 1}" for e in epochs)],
            [[layer, v, *(c.get(e, "-") for e in epochs)] for (layer, v), c in cells.items()],
            numeric=range(2, 2 + len(epochs))))
    return out


def compare_report(parts: ComparePart | Sequence[ComparePart], *, model: str,
                   runs: Mapping[str, Mapping[str, object]],
                   differing_params: Sequence[tuple[str, str, str]] = (),
                   steps_per_epoch: int | None = None, run_name: str = "",
                   run_id: str = "", max_points: int = MAX_POINTS // 2) -> str:
    """The page of a compare run: the answer from the first part's input-side layer, then
    each part's panels (both variants over the steps, at most ``TIME_LAYERS_CAP`` layers),
    depth profile and tables.

    ``runs``: {variant: {"run_id": ..., "run_name": ..., "metrics": {key: final value}}}
    (``query.final_metrics``). ``differing_params``: ``compare.differing_params``' (param,
    noskip value, skip value). ``max_points``: buckets per drawn series (two per panel).
    """
    parts = [parts] if isinstance(parts, ComparePart) else list(parts)
    labels = list(runs) if len(runs) == 2 else list(SKIP_PAIR)
    skip_pair = tuple(labels) == SKIP_PAIR
    tables_rows = [as_rows(p.table) for p in parts]
    meta = " · ".join(html.escape(x) for x in [
        *( [f"run {run_name}"] if run_name else []), *([f"ID {run_id}"] if run_id else []),
        f"model {model}", *(f"{VARIANT_LABELS[v] if skip_pair else v}: "
                            f"{r.get('run_name', '')} ({r.get('run_id', '')})"
                            for v, r in runs.items())])
    warning = ""
    if differing_params:
        warning = ("<strong>Warning</strong>: the runs differ in " + ", ".join(
            f"<code>{html.escape(str(n))}</code> ({html.escape(labels[0])} "
            f"{html.escape(str(a))}, {html.escape(labels[1])} {html.escape(str(b))})"
            for n, a, b in differing_params)
            + ("; the comparison mixes these with the skip connections." if skip_pair
               else "; the comparison mixes their effects."))
    points = [md(line) for p in parts for line in p.diagnosis]
    figures, tables = [], []
    for part, rows in zip(parts, tables_rows):
        figures += _compare_figures(part, rows, steps_per_epoch, max_points, labels)
        tables += _compare_tables(part, rows, labels)
    metric_keys = list(dict.fromkeys(k for r in runs.values() for k in (r.get("metrics") or {})))
    tables.append("<h2>Runs</h2>" + html_table(
        ["variant", "run", "run ID", *metric_keys],
        [[v, r.get("run_name", ""), r.get("run_id", ""),
          *(fmt((r.get("metrics") or {}).get(k)) for k in metric_keys)] for v, r in runs.items()],
        numeric=range(3, 3 + len(metric_keys)), table_id="runs")
        + '<p class="note">Status: a layer\'s median relative to the output-side layer\'s '
          "median (Vanishing &lt; 1e-18 &lt; Tiny &lt; 1e-9 &lt; Weak &lt; 1e-3 &lt; Healthy &lt; "
          "1e3 &lt; Exploding); Dead = zero on at least half the steps.</p>")
    vs = "skip vs no skip" if skip_pair else f"{labels[1]} vs {labels[0]}"
    return page("compare run", f"compare {model}: {vs}",
                 _compare_headline(tables_rows[0] if tables_rows else [], labels), meta, points,
                 figures, tables, warning)


# --- the sweep run -------------------------------------------------------------------------
def _sweep_changes(cells: list[dict]) -> dict[tuple, tuple]:
    """{(skip, batch_norm): (shallowest row, deepest row, decades deep/shallow or None)}
    over the ResNets of each group that has at least two depths."""
    groups: dict[tuple, list] = {}
    for c in cells:
        if str(c.get("model", "")).startswith("resnet"):
            groups.setdefault((bool(c.get("skip")), bool(c.get("batch_norm"))), []).append(c)
    out = {}
    for key, rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: float(r["depth"]))
        if len(rows) > 1:
            out[key] = (rows[0], rows[-1], decades_or_none(rows[-1]["median"], rows[0]["median"]))
    return out


def _change(row, d) -> str:
    if float(row["median"]) == 0:
        return "is dead (median exactly 0)"
    return "-" if d is None else f"{'falls' if d < 0 else 'rises'} {abs(d):.1f} decades"


def _sweep_headline(changes: dict) -> str:
    """Skip against noskip at the same BatchNorm setting (no BatchNorm first: the notebook's)."""
    for bn in (False, True):
        n, s = changes.get((False, bn)), changes.get((True, bn))
        if n and s:
            return (f"From depth {int(n[0]['depth'])} to {int(n[1]['depth'])} "
                    f"({'with' if bn else 'no'} BatchNorm), the first-layer gradient "
                    f"{_change(n[1], n[2])} without skips and {_change(s[1], s[2])} with them.")
    for (skip, bn), (a, b, d) in changes.items():
        return (f"From depth {int(a['depth'])} to {int(b['depth'])} "
                f"({VARIANT_LABELS['skip' if skip else 'noskip']}, {'with' if bn else 'no'} "
                f"BatchNorm), the first-layer gradient {_change(b, d)}.")
    return "Too few ResNet depths to compare."


def _sweep_lines(changes: dict) -> list[str]:
    """Per (skip, batch_norm): the stem's median at the shallowest and deepest ResNet."""
    return [f"{VARIANT_LABELS['skip' if skip else 'noskip'].capitalize()}, "
            f"{'BatchNorm' if bn else 'no BatchNorm'}: {fmt(a['median'])} at depth "
            f"{int(a['depth'])} ({html.escape(str(a['model']))}), {fmt(b['median'])} at depth "
            f"{int(b['depth'])} ({html.escape(str(b['model']))}): {_change(b, d)}."
            for (skip, bn), (a, b, d) in changes.items()]


def sweep_report(cells, *, skipped: Sequence[str] = (), description: str = "",
                 run_name: str = "sweep", run_id: str = "") -> str:
    """The page of a sweep run. ``cells``: one row per cell (``sweep.summarize``'s frame or
    summary.json's "cells"): cell, model, depth, skip, batch_norm, layer, steps, median, p10,
    p90, zero_fraction, health, test_accuracy, run_id, reused. ``description``: what every
    cell trained on (``sweep.describe_training``)."""
    rows = as_rows(cells)
    changes = _sweep_changes(rows)
    headline = html.escape(_sweep_headline(changes)) if rows else "No cells."
    points = _sweep_lines(changes) + ([f"Left out: {html.escape(', '.join(skipped))} (no skip connections to "
                       "switch on)."] if skipped else [])
    reused = sum(bool(r.get("reused")) for r in rows)
    points.append(f"{reused} of {len(rows)} cells reused a FINISHED run with the same "
                  "parameters and code.")
    figures = []
    if rows:
        fig, floor, ceiling = sweep_figure(rows)
        figures.append(Figure("First-layer gradient norm against depth",
                               "Median over each network's training steps of the L2 norm of "
                               "dLoss/d(its first probed layer's output), whiskers the 10th to "
                               "90th percentile; solid: no BatchNorm, dashed: BatchNorm. "
                               + marks_note(rows, floor, ceiling), fig))
    table = html_table(
        ["cell", "depth", "first layer", "steps", "median", "p10", "p90", "zero steps",
         "health", "test acc", "run"],
        [[r.get("cell", ""), r.get("depth", ""), r.get("layer", ""), r.get("steps", ""),
          fmt(r.get("median")), fmt(r.get("p10")), fmt(r.get("p90")), pct(r.get("zero_fraction")),
          r.get("health") or "-", fmt(r.get("test_accuracy")),
          f"{r.get('run_id', '')}{' (reused)' if r.get('reused') else ''}"] for r in rows],
        numeric=(1, 3, 4, 5, 6, 7, 9), table_id="cells")
    meta = " · ".join(html.escape(x) for x in (f"run {run_name}", f"ID {run_id}" if run_id else "",
                                               description, f"{len(rows)} cells") if x)
    return page("sweep run", "sweep: first-layer gradient against depth", headline, meta,
                 points, figures, ["<h2>Cells</h2>" + table])
