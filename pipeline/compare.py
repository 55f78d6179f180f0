"""The compare step: two training runs in, the answer out (plots, tables, a diagnosis).

Statistics are pure functions of the histories that ``query`` reads; the figures come from
``plots`` and everything is written by ``tracking`` onto the compare step's own run.

``quantity`` picks the norms compared: ``output`` (``grad_norm/*``, dLoss/d(layer output)),
``weight`` (``weight_grad_norm/*``, dLoss/d(layer weight and bias)), ``both``, or ``auto``
(output when both runs have it, else weight). Each quantity gets the same figures, tables
and diagnosis; the weight ones are named ``comparison/weight_*``.

Status rule (README, "Reading the summary"): a layer's median norm is divided by the
median norm of the run's output-side probed layer (``fc`` by default) over the same steps:

    Dead        at least half of the steps have a norm of exactly 0
    Vanishing   ratio < 1e-18     (the notebook's ~1e-21 early layers)
    Tiny        ratio < 1e-9
    Weak        ratio < 1e-3
    Exploding   ratio > 1e3, or a non-finite median
    Healthy     otherwise

Weight-gradient norms get the same rule, relative to the output-side layer's weight-gradient
norm: the thresholds were set for output gradients and are applied to weights unchanged.

The two runs may differ in more than ``skip`` (``runs=latest`` matches the model only):
every other training parameter that can move the numbers and differs is named on stderr,
at the top of the summary and in the ``compare.differing_params`` tag; the compare goes on.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import click
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from . import console, names, plots, query, report_html
from .health import SEVERITY, decades
from .stats import epoch_stats, layer_stats
from .config import (ALL_LAYERS, AUTO, QUANTITIES as QUANTITY_CHOICES, Config, ConfigError,
                     fields, format_value)
from .query import QueryError
from .tracking import Tracker, public_uri

VARIANTS = ("noskip", "skip")  # a skip pair's labels, in order: the first run, the second
LABEL_BY = ("auto", "name")     # compare's `label`, besides a parameter's name

ARTIFACT_DIR = "comparison"


def artifact_paths(prefix: str) -> dict[str, str]:
    """One quantity's artifact paths: ``prefix`` is "" for output gradients (the original
    names, a documented API) and "weight_" for weight gradients."""
    return {"norms_plot": f"{ARTIFACT_DIR}/{prefix}gradient_norms.png",
            "depth_plot": f"{ARTIFACT_DIR}/{prefix}depth_profile.png",
            "summary_md": f"{ARTIFACT_DIR}/{prefix}summary.md",
            "summary_csv": f"{ARTIFACT_DIR}/{prefix}summary.csv",
            "summary_json": f"{ARTIFACT_DIR}/{prefix}summary.json",
            "epochs_csv": f"{ARTIFACT_DIR}/{prefix}per_epoch.csv"}


# gradient_norms.png draws at most this many layer panels (2.3 inches each): with layers=all
# a ResNet-50 shares 50 layers, a 116-inch figure nobody reads. The tables and the
# difference heatmap keep every layer.
PANEL_CAP = 8


@dataclass(frozen=True)
class Quantity:
    """One kind of gradient norm a run may hold, and where its comparison goes."""
    name: str              # names.OUTPUT | names.WEIGHT: training's `probe` value
    label: str             # what the norms are of, for the figures
    heading: str           # the summary's title
    status_note: str       # appended to the summary's status rule
    norms_plot: str
    depth_plot: str
    difference_plot: str
    difference_tag: str
    summary_md: str
    summary_csv: str
    summary_json: str
    epochs_csv: str

    @property
    def record(self) -> str:
        """For messages: ``output-gradient norms (grad_norm/*)``."""
        return f"{self.name}-gradient norms ({names.METRIC_PREFIX[self.name]}*)"


OUTPUT = Quantity(names.OUTPUT, "dLoss/d(layer output)", "Gradient norms", "",
                  difference_plot=names.DIFFERENCE_PLOT, difference_tag=names.DIFFERENCE_TAG,
                  **artifact_paths(""))
WEIGHT = Quantity(names.WEIGHT, "dLoss/d(layer weights)", "Weight-gradient norms",
                  " Weight-gradient norms get the same rule: a layer's median weight-gradient "
                  "norm relative to that of the output-side layer, with the thresholds set for "
                  "output gradients, unchanged.",
                  difference_plot=names.WEIGHT_DIFFERENCE_PLOT,
                  difference_tag=names.WEIGHT_DIFFERENCE_TAG, **artifact_paths("weight_"))
QUANTITIES = {q.name: q for q in (OUTPUT, WEIGHT)}

# The artifact paths by name, as tests and readers import them.
NORMS_PLOT, DEPTH_PLOT, DIFFERENCE_PLOT = OUTPUT.norms_plot, OUTPUT.depth_plot, OUTPUT.difference_plot
SUMMARY_MD, SUMMARY_CSV, SUMMARY_JSON = OUTPUT.summary_md, OUTPUT.summary_csv, OUTPUT.summary_json
EPOCHS_CSV = OUTPUT.epochs_csv
WEIGHT_SUMMARY_MD, WEIGHT_SUMMARY_CSV = WEIGHT.summary_md, WEIGHT.summary_csv
WEIGHT_SUMMARY_JSON, WEIGHT_EPOCHS_CSV = WEIGHT.summary_json, WEIGHT.epochs_csv


@dataclass
class Side:
    variant: str
    run: object
    history: pd.DataFrame   # the chosen layers plus the run's output-side layer (the reference)
    layers: list[str]       # the chosen layers

    @classmethod
    def read(cls, variant: str, run, rename: dict[str, str],
             quantity: str = names.OUTPUT) -> "Side":
        """The history of the run's layers in ``rename`` (its own names -> the compared
        names), plus its output-side layer, the status rule's reference."""
        own = list(rename)
        reference = query.probed_layers(run, quantity)[-1]
        wanted = own + ([reference] if reference not in own else [])
        history = query.gradient_history(run.info.run_id, wanted, quantity)
        history["layer"] = history["layer"].cat.rename_categories(
            [rename.get(x, x) for x in history["layer"].cat.categories])
        return cls(variant, run, history, [rename[x] for x in own])

    @property
    def chosen_history(self) -> pd.DataFrame:
        return self.history[self.history["layer"].isin(self.layers)]


def select_runs(experiment: str | None, run_ids: list[str] | None,
                label: str = "auto") -> dict[str, object]:
    """The two runs, by label, in order. Given IDs: a skip and a noskip training run are
    ``{"noskip": run, "skip": run}`` (with ``label=auto``); any other two runs are labelled
    by ``label``: their run names (auto, name) or a parameter's values. Without IDs: the
    latest FINISHED run of each variant (the second of the first one's model)."""
    if run_ids:
        if len(run_ids) != 2:
            raise QueryError(f"runs: give exactly two run IDs, got {len(run_ids)}")
        if run_ids[0] == run_ids[1]:
            raise QueryError(f"runs: {run_ids[0]} twice; give two different runs")
        runs = [query.get_run(r) for r in run_ids]
        variants = [r.data.tags.get(names.VARIANT_TAG) for r in runs]
        if label == "auto" and sorted(v or "" for v in variants) == sorted(VARIANTS):
            by_variant = dict(zip(variants, runs))
            return {v: by_variant[v] for v in VARIANTS}
        return dict(zip(labels_of(runs, label), runs))
    selected = {}
    model = None
    for variant in VARIANTS:
        filters = {"skip": variant == "skip"}
        if model:
            filters["model"] = model  # the second variant must match the first one's model
        found = query.find_runs(experiment, status="FINISHED", **filters)
        if not len(found):
            raise QueryError(f"experiment: {query.experiment_ref(experiment)!r} has no FINISHED "
                             f"{variant} run{' of ' + model if model else ''}; train it with "
                             f"`mlflow run . -P skip={'true' if variant == 'skip' else 'false'}`"
                             " or pass -P runs=ID,ID")
        row = found.iloc[0]
        model = row.get("params.model") or model
        selected[variant] = query.get_run(row["run_id"])
    return selected


def labels_of(runs: list, label: str) -> list[str]:
    """Two distinct labels: the runs' names, or ``param=value`` of a parameter they logged;
    a short run ID is added where the two would read alike."""
    if label in LABEL_BY:
        found = [r.info.run_name or r.info.run_id[:8] for r in runs]
    else:
        missing = [r.info.run_id for r in runs if label not in r.data.params]
        if missing:
            raise QueryError(f"label: run {missing[0]} has no param {label!r}; allowed: auto, "
                             "name, or a param both runs logged")
        found = [f"{label}={r.data.params[label]}" for r in runs]
    if found[0] == found[1]:
        found = [f"{text} {r.info.run_id[:6]}" for text, r in zip(found, runs)]
    # Labels become metric names (compare/test_accuracy/<label>): MLflow's characters only.
    return [re.sub(r"[^/\w.\- ]", "_", text) for text in found]


def is_skip_pair(runs: dict[str, object]) -> bool:
    return tuple(runs) == VARIANTS


# --- what else differs between the two runs ----------------------------------------------------
# Training parameters that cannot move the compared norms: they say where a run is logged,
# what it records, how it is kept, or how the same arithmetic is executed. Every other Config
# field counts, fields added later included: a new parameter is reported until someone
# decides here that it is inert.
INERT_PARAMS = frozenset({
    "skip",                                   # the one difference the comparison is about
    "experiment",                             # where the run was logged
    "layers", "probe",                        # what was recorded; compare reads what both hold
    "num_workers", "data_path",               # the same batches in the same order, bit for bit
    "graph",                                  # the same kernels, replayed from one capture
    "channels_last",                          # a memory layout: rounding order at most
    "flush_every",                            # when the norms are read back, not their values
    "checkpoint_every", "checkpoint_dir", "resume", "log_checkpoint",
    "log_model", "register_as", "log_system_metrics",
    # stop vs continue matters only after a NaN, which the nonfinite.* tags report
    "on_nan",
    # DDP: the ranks' count is compared as world_size (the logged param); how they are
    # spread over machines and where they meet does not reach the arithmetic
    "nproc_per_node", "nnodes", "rdzv_endpoint",
})

# Parameters that decide the numbers only beside a value of another: the data folder of an
# image folder (CIFAR-10 is the same MD5-checked files wherever it lives), the synthetic
# set's sizes, and how often the non-default layers of layers=all become metrics (the
# histories compare reads).
ONLY_WITH = {"data_dir": ("dataset", "imagefolder"),
             "synthetic_size": ("dataset", "synthetic"),
             "synthetic_test_size": ("dataset", "synthetic"),
             "metric_every": ("layers", ALL_LAYERS)}

# `device=auto` is resolved when the run starts; the run's tag has what it resolved to.
RESOLVED_BY_TAG = {"device": names.DEVICE_TAG}


def _param_of(run, name: str):
    """The parsed value ``name`` had in ``run``, or None when the run did not log it."""
    tag = RESOLVED_BY_TAG.get(name)
    if tag and run.data.tags.get(tag):
        return run.data.tags[tag].split(":")[0]  # cuda:0 and cuda:1 compute alike
    raw = run.data.params.get(name)
    return None if raw is None else query.param_value(name, raw)


def differing_params(runs: dict[str, object]) -> list[tuple[str, str, str]]:
    """``(param, first run's value, second's)`` for each training parameter the two runs
    differ in (apart from ``skip``, for a skip pair), in Config's order, then
    ``world_size``; values compared parsed (``1e-3`` is ``0.001``), shown canonical,
    "not logged" where a run lacks the param."""
    inert = INERT_PARAMS if is_skip_pair(runs) else INERT_PARAMS - {"skip"}
    candidates = [f.name for f in fields(Config) if f.name not in inert]
    found = []
    for name in [*candidates, names.WORLD_SIZE_PARAM]:
        if name in ONLY_WITH:
            other, value = ONLY_WITH[name]
            if all(_param_of(run, other) != value for run in runs.values()):
                continue
        values = [_param_of(run, name) for run in runs.values()]
        if values[0] != values[1]:
            found.append((name, *("not logged" if x is None else format_value(x) for x in values)))
    return found


def differences_line(found: list[tuple[str, str, str]], labels: Sequence[str] = VARIANTS) -> str:
    """``the runs differ in batch_norm (noskip true, skip false), image_size (64, 32); ...``"""
    first, second = labels
    listed = ", ".join(f"{name} ({first} {a}, {second} {b})" if i == 0 else f"{name} ({a}, {b})"
                       for i, (name, a, b) in enumerate(found))
    mixed = ("with the skip connections" if tuple(labels) == VARIANTS
             else "in any difference between them")
    return f"the runs differ in {listed}; the comparison mixes these {mixed}"


def params_note(found: list[tuple[str, str, str]], labels: Sequence[str] = VARIANTS) -> str:
    """The summary's line on the runs' training parameters."""
    if not found:
        return ("Training parameters: the same apart from skip." if tuple(labels) == VARIANTS
                else "Training parameters: the same.")
    return f"**Warning**: {differences_line(found, labels)}."


def choose_quantities(runs: dict[str, object], quantity: str = AUTO) -> list[Quantity]:
    """What to compare, checked against the norms both runs hold (their metrics)."""
    if quantity not in (None, *QUANTITY_CHOICES):  # the CLI checks it; Python callers may not
        raise ConfigError("quantity", f"{quantity!r} is not allowed; allowed: "
                                      + ", ".join(QUANTITY_CHOICES))
    held = {v: query.probe_quantities(runs[v]) for v in runs}
    for v in runs:
        if not held[v]:
            raise QueryError(f"runs: run {runs[v].info.run_id} ({v}) has no "
                             + " or ".join(f"{p}*" for p in names.METRIC_PREFIX.values())
                             + " metrics; is it a training run of this project?")
    shared = [q for q in QUANTITIES if all(q in held[v] for v in runs)]
    if quantity in (None, AUTO):
        if shared:
            return [QUANTITIES[shared[0]]]  # output first: the notebook's quantity
        raise QueryError(f"quantity: auto finds no gradient norms that both runs hold; "
                         f"{_holdings(runs, held)}; train both with the same probe")
    wanted = list(QUANTITIES) if quantity == "both" else [quantity]
    if not all(q in shared for q in wanted):
        instead = (f"compare quantity={shared[0]}, or train both with probe={quantity}"
                   if shared else f"train both with probe={quantity}")
        raise QueryError(f"quantity: {quantity} needs "
                         + " and ".join(QUANTITIES[q].record for q in wanted)
                         + f" in both runs; {_holdings(runs, held)}; {instead}")
    return [QUANTITIES[q] for q in wanted]


def _holdings(runs: dict[str, object], held: dict[str, list[str]]) -> str:
    """``the noskip run <id> has output-gradient norms (grad_norm/*), the skip run ...``"""
    return ", ".join(f"the {v} run {runs[v].info.run_id} has "
                     + " and ".join(QUANTITIES[q].record for q in held[v]) for v in runs)


def align(runs: dict[str, object], wanted: list[str] | None,
          quantities: Sequence[Quantity] = (OUTPUT,)) -> tuple[list[str], dict[str, dict]]:
    """The compared layers, and for each run ``{its own layer name: the compared name}``.

    Runs that share layer names compare those (in the first run's order; ``wanted`` must be
    among them). Runs of different networks (no shared ``model`` param: a ``pipeline.watch``
    run of a user's own network, say), which share none, compare their layers by position:
    as many as the shorter has, evenly across each one's depth, input side and head always
    among them, each named ``<first's> vs <second's>``."""
    def probed(run) -> list[str]:
        lists = [query.probed_layers(run, q.name) for q in quantities]
        return [layer for layer in lists[0] if all(layer in other for other in lists[1:])]
    per_run = {v: probed(r) for v, r in runs.items()}
    (a, own_a), (b, own_b) = per_run.items()
    shared = [layer for layer in own_a if layer in own_b]
    models = [run.data.params.get("model") for run in runs.values()]
    if not shared and not wanted and (None in models or models[0] != models[1]):
        n = min(len(own_a), len(own_b))
        picks_a, picks_b = panel_layers(own_a, n), panel_layers(own_b, n)
        keys = [x if x == y else f"{x} vs {y}" for x, y in zip(picks_a, picks_b)]
        return keys, {a: dict(zip(picks_a, keys)), b: dict(zip(picks_b, keys))}
    if not shared:
        raise QueryError("layers: the two runs share no probed layer ("
                         + "; ".join(f"{v}: {', '.join(ls)}" for v, ls in per_run.items()) + ")")
    if wanted:
        missing = [layer for layer in wanted if layer not in shared]
        if missing:
            raise QueryError(f"layers: {', '.join(missing)} not probed in both runs; "
                             f"shared: {', '.join(shared)}")
        shared = [layer for layer in shared if layer in wanted]
    return shared, {v: {x: x for x in shared} for v in runs}


def ratio_column(first: str, second: str) -> str:
    """The table's column of second-over-first medians (a documented CSV column)."""
    return "skip_over_noskip" if (first, second) == VARIANTS else "second_over_first"


def summarize(sides: list[Side]) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def read_differences(runs: dict[str, object], layers: list[str] | None,
                     quantities: Sequence[Quantity] = (OUTPUT,),
                     rename: dict[str, dict] | None = None) -> dict[str, tuple]:
    """``{quantity name: (plots.Difference, "")}`` from both runs' ``gradients/norms.npz``
    (read once for all quantities), or ``(None, reason)`` where it cannot be drawn. Never
    raises: the heatmap is an extra, and a run without the dense record (trained before it
    existed) still compares on its metrics."""
    dense, missing = {}, []
    for variant in runs:
        run_id = runs[variant].info.run_id
        try:
            dense[variant] = query.dense_norms(run_id)
            if dense[variant] is not None and rename is not None:  # the compared names
                dense[variant]["layers"] = np.array([rename[variant].get(str(x), str(x))
                                                     for x in dense[variant]["layers"]])
        except (QueryError, MlflowException, OSError, KeyError, ValueError) as error:
            reason = (f"{names.NORMS_NPZ} of run {run_id} ({variant}) could not be read "
                      f"({type(error).__name__}: {error})")
            return {q.name: (None, reason) for q in quantities}
        if dense[variant] is None:
            missing.append(f"run {run_id} ({variant})")
    if missing:
        reason = (f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no "
                  f"{names.NORMS_NPZ} (runs trained before the dense record have none); "
                  "the per-layer metrics are compared without it")
        return {q.name: (None, reason) for q in quantities}
    return {q.name: _difference(runs, dense, layers, q) for q in quantities}


def _difference(runs: dict[str, object], dense: dict[str, dict], layers: list[str] | None,
                quantity: Quantity) -> tuple:
    key = names.NPZ_ARRAY[quantity.name]
    first, second = runs
    for variant in runs:
        if key not in dense[variant]:
            run = runs[variant]
            return None, (f"run {run.info.run_id} ({variant}) was trained with "
                          f"probe={run.data.params.get('probe', names.OUTPUT)}: its "
                          f"{names.NORMS_NPZ} has no {quantity.name}-gradient norms")
    try:
        found = plots.difference_matrix(dense[first], dense[second], layers, key=key,
                                        labels=(first, second))
    except (KeyError, ValueError, IndexError) as error:  # a malformed file
        return None, f"the runs' {names.NORMS_NPZ} do not fit together ({error})"
    if found is None:
        return None, f"the runs' {names.NORMS_NPZ} share no layer or no step"
    return found, ""


def figure_notes(chosen: list[str], panels: list[str], difference, skipped: str,
                 quantity: Quantity = OUTPUT) -> list[str]:
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


def markdown(table: pd.DataFrame, per_epoch: pd.DataFrame, sides: list[Side],
             figures: list[str] = (), quantity: Quantity = OUTPUT, params: str = "") -> str:
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


@dataclass
class Part:
    """One quantity's comparison, all of it computed before the compare run opens."""
    quantity: Quantity
    sides: list[Side]
    table: pd.DataFrame
    per_epoch: pd.DataFrame
    difference: object      # plots.Difference, or None when not drawn
    skipped: str            # why not
    text: str               # its markdown summary


def compare(experiment: str | None = None, run_ids: list[str] | None = None,
            layers: list[str] | None = None, params: dict[str, str] | None = None,
            quantity: str = AUTO, label: str = "auto") -> str:
    """Run the compare step; returns the compare run's ID. Raises QueryError on bad input
    (ConfigError for a ``quantity`` that is not auto, output, weight or both)."""
    # --- 1. choose and read everything before a run is opened ------------------------
    runs = select_runs(experiment, run_ids, label)
    labels = list(runs)
    ids = {v: run.info.run_id for v, run in runs.items()}
    console.say(["compare: " + ", ".join(f"{v} = {run.info.run_name} ({ids[v]})"
                                         for v, run in runs.items())])
    quantities = choose_quantities(runs, quantity)
    chosen, rename = align(runs, layers, quantities)
    panels = panel_layers(chosen)
    differences = read_differences(runs, chosen if layers else None, quantities, rename)
    # Not refused: comparing other settings can be deliberate; but never silent.
    differing = differing_params(runs)
    if differing:
        click.echo(f"compare: warning: {differences_line(differing, labels)}", err=True)
    parts = []
    for q in quantities:
        sides = [Side.read(v, runs[v], rename[v], q.name) for v in labels]
        table, per_epoch = summarize(sides)
        difference, skipped = differences[q.name]
        text = markdown(table, per_epoch, sides,
                        figure_notes(chosen, panels, difference, skipped, q), q,
                        params_note(differing, labels))
        parts.append(Part(q, sides, table, per_epoch, difference, skipped, text))

    # --- 2. the compare run --------------------------------------------------------------
    first = runs[labels[0]]
    models = {run.data.params.get("model") for run in runs.values()}
    model = models.pop() if len(models) == 1 and None not in models else None
    # The compare run goes into the experiment it read from: the named one, or that of
    # the given runs (under `mlflow run` the run already exists, where `mlflow run` put it).
    if run_ids and experiment in (None, AUTO):
        experiment_id = first.info.experiment_id
    else:
        experiment_id = query.experiment_id(experiment)
    pair_tags = ({f"compare.{v}_run": ids[v] for v in VARIANTS} if is_skip_pair(runs) else {})
    tracker = Tracker.start(f"compare-{model}" if model else "compare", params or {}, {
        names.COMPARE_RUNS_TAG: ",".join(ids.values()), **pair_tags,
        names.COMPARE_LABELS_TAG: ",".join(labels),
        names.COMPARE_LAYERS_TAG: ",".join(chosen),
        names.PANEL_LAYERS_TAG: ",".join(panels),
        names.QUANTITY_TAG: "both" if len(parts) > 1 else parts[0].quantity.name,
        names.DIFFERING_PARAMS_TAG: ",".join(name for name, _, _ in differing) or "none",
        **{p.quantity.difference_tag: "logged" if p.difference is not None
           else f"skipped: {p.skipped}" for p in parts},
    }, experiment_id=experiment_id)
    with tracker.ending():
        per_epoch_steps = int(first.data.tags.get(names.STEPS_PER_EPOCH_TAG, 0)) or None
        title = model or " vs ".join(run.info.run_name or "" for run in runs.values())
        for part in parts:
            _log_part(tracker, part, runs, chosen, panels, title, per_epoch_steps, differing)
        tracker.log_totals(summary_metrics(parts, runs))
        tracker.log_text(_page(parts, runs, title, differing, per_epoch_steps, tracker.run_id),
                         names.REPORT_HTML)
        # Each summary.md states the params on its own; the description says it once.
        said = f"{params_note(differing, labels)}\n\n"
        tracker.set_note("\n".join([parts[0].text, *(p.text.replace(said, "", 1)
                                                      for p in parts[1:])]),
                         tuple(part.quantity.summary_md for part in parts))
    _say_answer(parts[0], tracker)
    return tracker.run_id


def summary_metrics(parts: list[Part], runs: dict[str, object]) -> dict[str, float]:
    """What the runs table and chart view can plot across compare runs: per compared layer,
    how many decades the second run's median sits above the first's, and each run's final
    test accuracy."""
    a, b = runs
    out = {names.compare_test_accuracy(v): query.final_metrics(run)[names.TEST_ACCURACY]
           for v, run in runs.items()}
    for part in parts:
        medians = part.table.pivot(index="layer", columns="variant", values="median")
        for layer in medians.index:
            out[names.compare_decades(part.quantity.name, str(layer))] = decades(
                medians.loc[layer, b], medians.loc[layer, a])
    return out


def _page(parts: list[Part], runs: dict[str, object], title: str, differing,
          per_epoch_steps: int | None, run_id: str) -> str:
    """report.html: the comparison's answer, figures and tables on one page."""
    pages = []
    for part in parts:
        curves = {s.variant: {str(layer): (h["step"].to_numpy(), h["norm"].to_numpy())
                              for layer, h in s.chosen_history.groupby("layer", observed=True)}
                  for s in part.sides}
        pages.append(report_html.ComparePart(
            table=part.table, curves=curves, per_epoch=part.per_epoch,
            diagnosis=diagnosis(part.table, part.per_epoch, list(runs)),
            label=part.quantity.label, heading=part.quantity.heading))
    return report_html.compare_report(
        pages, model=title,
        runs={v: {"run_id": r.info.run_id, "run_name": r.info.run_name,
                  "metrics": query.final_metrics(r)} for v, r in runs.items()},
        differing_params=differing, steps_per_epoch=per_epoch_steps, run_id=run_id)


def _say_answer(part: Part, tracker: Tracker) -> None:
    """The diagnosis, each layer's medians and statuses, and how to open the compare run."""
    labels = [side.variant for side in part.sides]
    table = part.table
    layers = list(dict.fromkeys(table["layer"]))
    rows = {v: table[table["variant"] == v].set_index("layer").loc[layers] for v in labels}
    on = console.colour_on(sys.stdout)
    console.say([*console.compare_lines(labels, diagnosis(table, part.per_epoch, labels), layers,
                                        {v: list(rows[v]["median"]) for v in labels},
                                        {v: list(rows[v]["status"]) for v in labels}, on),
                 *console.how_to_open(public_uri(mlflow.get_tracking_uri()),
                                      tracker.experiment_id, tracker.run_id)])


def _log_part(tracker: Tracker, part: Part, runs: dict[str, object], chosen: list[str],
              panels: list[str], model: str, per_epoch_steps: int | None,
              differing: list[tuple[str, str, str]] = ()) -> None:
    """One quantity's figures and tables onto the compare run."""
    q, difference = part.quantity, part.difference
    labels = list(runs)
    histories = {s.variant: s.chosen_history for s in part.sides}
    note = (f"{len(panels)} of {len(chosen)} layers, evenly across depth; every layer is in "
            f"the tables{' and ' + q.difference_plot if difference is not None else ''}"
            if len(panels) < len(chosen) else None)
    figures = [(lambda: plots.comparison_norms(histories, panels, model, note, q.label),
                q.norms_plot),
               (lambda: plots.depth_profile(part.table, model, q.label, labels), q.depth_plot)]
    if difference is not None:
        figures.append((lambda: plots.difference_heatmap(difference, model, per_epoch_steps,
                                                         q.label), q.difference_plot))
    for make, path in figures:  # one figure in memory at a time
        fig = make()
        try:
            tracker.log_figure(fig, path)
        finally:
            plots.close(fig)
    tracker.log_text(part.text, q.summary_md)
    tracker.log_text(part.table.to_csv(index=False), q.summary_csv)
    tracker.log_text(part.per_epoch.to_csv(index=False), q.epochs_csv)
    first, second = labels
    tracker.log_dict({"quantity": q.name, "runs": {v: runs[v].info.run_id for v in labels},
                      "layers": chosen, "panel_layers": panels,
                      "differing_params": [{"param": n, first: a, second: b}
                                           for n, a, b in differing],
                      "summary": _records(part.table), "per_epoch": _records(part.per_epoch)},
                     q.summary_json)


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe rows: NaN becomes null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]
