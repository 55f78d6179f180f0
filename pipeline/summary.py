"""The compare step's tables and words, from the two runs' histories: per-layer and per-epoch
tables, the diagnosis, the notes on the figures, and the markdown summary."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from . import names, query
from .health import SEVERITY
from .stats import epoch_stats, layer_stats

VARIANTS = names.VARIANTS
# gradient_norms.png draws at most this many layer panels (2.3 inches each): with layers=all
# a ResNet-50 shares 50 layers, a 116-inch figure nobody reads. The tables and the
# difference heatmap keep every layer.
PANEL_CAP = 8


def ratio_column(first: str, second: str) -> str:
    """The table's column of second-over-first medians (a documented CSV column)."""
    return "skip_over_noskip" if (first, second) == VARIANTS else "second_over_first"


def summarize(sides: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The overall table (layer x variant) and the per-epoch table."""
    overall, per_epoch = [], []
    for side in sides:
        stats = layer_stats(side.history, side.layers)
        stats.insert(0, "depth", range(len(stats)))
        stats.insert(2, "variant", side.variant)
        stats.insert(3, "run_id", side.run.info.run_id)
        for key, value in query.final_metrics(side.run).items():
            stats[key] = value
        overall.append(stats)
        ep = epoch_stats(side.history, side.layers)
        ep.insert(1, "variant", side.variant)
        per_epoch.append(ep)
    table = pd.concat(overall, ignore_index=True)
    first, second = (side.variant for side in sides)
    medians = table.pivot(index="layer", columns="variant", values="median")
    ratio = (medians[second] / medians[first]).replace([np.inf, -np.inf], np.nan)
    table[ratio_column(first, second)] = table["layer"].map(ratio)
    order = {side.variant: i for i, side in enumerate(sides)}
    table = table.sort_values(["depth", "variant"], key=lambda c: c.map(order) if c.name == "variant"
                              else c, kind="stable").reset_index(drop=True)
    return table, pd.concat(per_epoch, ignore_index=True)


def panel_layers(layers: list[str], cap: int = PANEL_CAP) -> list[str]:
    """At most ``cap`` of ``layers``, evenly spaced across depth, the first and last always
    among them (input side and head: where skips matter most, and the reference)."""
    if len(layers) <= cap:
        return list(layers)
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, cap)).astype(int))
    return [layers[i] for i in picks]


def figure_notes(chosen: list[str], panels: list[str], difference, skipped: str,
                 quantity) -> list[str]:
    """The summary's lines about what the figures show (the caps and the heatmap's floor)."""
    lines = []
    if len(panels) < len(chosen):
        lines.append(f"- `{quantity.norms_plot}` draws {len(panels)} of the {len(chosen)} "
                     "compared layers, evenly across depth: " + ", ".join(f"`{x}`" for x in panels)
                     + "; the tables below have all of them"
                     + (", and so does the difference heatmap." if difference is not None else "."))
    if difference is not None:
        first, second = difference.labels
        lines.append(f"- `{quantity.difference_plot}`: log10({second} norm) - log10({first} norm) "
                     f"for {len(difference.layers)} layers x {difference.steps} shared batches"
                     + (f" (a column is the mean of {difference.per_column} batches)"
                        if difference.per_column > 1 else "")
                     + (f"; zero (or non-finite) norms, {first}: "
                        f"{difference.floored[first]}, {second}: {difference.floored[second]}, "
                        f"are floored at 1e{difference.floor:g}, one decade below the smallest "
                        "positive norm of either run." if any(difference.floored.values())
                        else "; neither run has a zero norm."))
    else:
        lines.append(f"- `{quantity.difference_plot}` not drawn: {skipped}.")
    return lines


def _g(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def diagnosis(table: pd.DataFrame, per_epoch: pd.DataFrame,
              labels: Sequence[str] = VARIANTS) -> list[str]:
    """Plain-language findings: the input-side layer, and any layer whose status worsened
    from the first epoch to a later one (the collapse a median hides)."""
    a, b = labels
    first = table[table["depth"] == table["depth"].min()].set_index("variant")
    layer = first["layer"].iloc[0]
    ratio = _g(first.loc[b, ratio_column(a, b)])
    if tuple(labels) == VARIANTS:
        found = [f"- Input-side layer `{layer}`: median {_g(first.loc['noskip', 'median'])} "
                 f"without skips ({first.loc['noskip', 'status']}), "
                 f"{_g(first.loc['skip', 'median'])} with skips ({first.loc['skip', 'status']}); "
                 f"skip/noskip = {ratio}."]
    else:
        found = [f"- Input-side layer `{layer}`: median {_g(first.loc[a, 'median'])} in {a} "
                 f"({first.loc[a, 'status']}), {_g(first.loc[b, 'median'])} in {b} "
                 f"({first.loc[b, 'status']}); {b}/{a} = {ratio}."]
    rank = SEVERITY
    for (lay, variant), g in per_epoch.groupby(["layer", "variant"], observed=True, sort=False):
        g = g.sort_values("epoch")
        start = g.iloc[0]
        worse = g[g["status"].map(rank) > rank[start["status"]]]
        if len(worse):
            w = worse.iloc[0]
            found.append(f"- `{lay}` ({variant}) went from {start['status']} in epoch "
                         f"{int(start['epoch']) + 1} to {w['status']} in epoch {int(w['epoch']) + 1}.")
    return found


def markdown(table: pd.DataFrame, per_epoch: pd.DataFrame, sides: list,
             figures: list[str], quantity, params: str = "") -> str:
    """``params``: ``params_note``'s line, first under the title: a reader must know what
    else differs before reading any number as the skip connections' doing."""
    g = _g
    labels = [side.variant for side in sides]
    a, b = labels
    skip_pair = tuple(labels) == VARIANTS
    column = ratio_column(a, b)
    lines = [f"## {quantity.heading}: " + ("skip vs no skip" if skip_pair else f"{b} vs {a}"),
             "", *([params, ""] if params else []), *diagnosis(table, per_epoch, labels), "",
             *([*figures, ""] if figures else []),
             "| layer | variant | median | min | max | first | last | early | late | zero steps "
             f"| {'skip/noskip' if skip_pair else f'{b}/{a}'} | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table.itertuples():
        lines.append(f"| `{r.layer}` | {r.variant} | {g(r.median)} | {g(r.min)} | {g(r.max)} | "
                     f"{g(r.first)} | {g(r.last)} | {g(r.early_median)} | {g(r.late_median)} | "
                     f"{r.zero_fraction:.0%} | {g(getattr(r, column))} | {r.status} |")
    epochs = sorted(per_epoch["epoch"].unique())
    lines += ["", "### Per epoch: median norm (status)", "",
              "| layer | variant | " + " | ".join(f"epoch {e + 1}" for e in epochs) + " |",
              "|---|---|" + "---:|" * len(epochs)]
    for (layer, variant), g_ in per_epoch.groupby(["layer", "variant"], observed=True, sort=False):
        cells = {int(r.epoch): f"{g(r.median)} ({r.status})" for r in g_.itertuples()}
        lines.append(f"| `{layer}` | {variant} | " + " | ".join(cells.get(e, "-") for e in epochs) + " |")
    lines += ["", "### Runs", "", "| variant | run | train acc | train loss | test acc | test loss |",
              "|---|---|---:|---:|---:|---:|"]
    for side in sides:
        m = query.final_metrics(side.run)
        lines.append(f"| {side.variant} | `{side.run.info.run_id}` ({side.run.info.run_name}) | "
                     f"{g(m[names.TRAIN_ACCURACY])} | {g(m[names.TRAIN_LOSS])} | "
                     f"{g(m[names.TEST_ACCURACY])} | {g(m[names.TEST_LOSS])} |")
    lines += ["", "Status: a layer's median relative to the output-side layer's median "
                  "(Vanishing < 1e-18 < Tiny < 1e-9 < Weak < 1e-3 < Healthy < 1e3 < Exploding); "
                  "Dead = zero on at least half the steps. Early/late = medians over the first "
                  "and last tenth of the steps." + quantity.status_note]
    return "\n".join(lines) + "\n"


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe rows: NaN becomes null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]
