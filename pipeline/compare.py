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
from dataclasses import dataclass
from typing import Sequence

import click
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from . import names, plots, query
from .health import SEVERITY, status
from .config import (ALL_LAYERS, AUTO, QUANTITIES as QUANTITY_CHOICES, Config, ConfigError,
                     fields, format_value)
from .query import QueryError
from .tracking import Tracker

VARIANTS = ("noskip", "skip")

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


def layer_stats(history: pd.DataFrame, layers: list[str] | None = None) -> pd.DataFrame:
    """One row per layer of one run, input side first.

    ``history`` must include the run's output-side probed layer as its last layer: it is
    the reference of the status rule, whichever ``layers`` are reported.
    """
    rows = []
    for layer, g in history.groupby("layer", observed=True, sort=True):
        v = g.sort_values("step")["norm"].to_numpy()
        k = max(1, len(v) // 10)  # early/late: first and last tenth of the steps
        rows.append({
            "layer": layer, "steps": len(v),
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "first": float(v[0]), "last": float(v[-1]),
            "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9)),
            "early_median": float(np.median(v[:k])), "late_median": float(np.median(v[-k:])),
            "zero_fraction": float((v == 0).mean()),
        })
    stats = pd.DataFrame(rows)
    reference = stats["median"].iloc[-1]
    stats["status"] = [status(m, z, reference) for m, z in zip(stats["median"], stats["zero_fraction"])]
    if layers is not None:
        stats = stats[stats["layer"].isin(layers)].reset_index(drop=True)
    return stats


def epoch_stats(history: pd.DataFrame, layers: list[str] | None = None) -> pd.DataFrame:
    """Median, zero fraction and status per (layer, epoch): the time course a median hides."""
    frames = []
    for epoch, g in history.groupby("epoch", sort=True):
        s = layer_stats(g, layers)[["layer", "median", "zero_fraction", "status"]]
        s.insert(1, "epoch", int(epoch))
        frames.append(s)
    return pd.concat(frames, ignore_index=True)


@dataclass
class Side:
    variant: str
    run: object
    history: pd.DataFrame   # the chosen layers plus the run's output-side layer (the reference)
    layers: list[str]       # the chosen layers

    @classmethod
    def read(cls, variant: str, run, layers: list[str], quantity: str = names.OUTPUT) -> "Side":
        reference = query.probed_layers(run, quantity)[-1]
        wanted = layers + ([reference] if reference not in layers else [])
        return cls(variant, run, query.gradient_history(run.info.run_id, wanted, quantity),
                   layers)

    @property
    def chosen_history(self) -> pd.DataFrame:
        return self.history[self.history["layer"].isin(self.layers)]


def select_runs(experiment: str | None, run_ids: list[str] | None) -> dict[str, object]:
    """``{"noskip": run, "skip": run}``: the given IDs, or the latest FINISHED of each variant."""
    if run_ids:
        if len(run_ids) != 2:
            raise QueryError(f"runs: give exactly two run IDs (one per variant), got {len(run_ids)}")
        runs = [query.get_run(r) for r in run_ids]
        variants = [r.data.tags.get(names.VARIANT_TAG) for r in runs]
        if sorted(v or "" for v in variants) != sorted(VARIANTS):
            said = [f"{i} is {v}" if v else f"{i} is not a training run"
                    for i, v in zip(run_ids, variants)]
            raise QueryError(f"runs: need one skip and one noskip training run; {', '.join(said)}")
        return dict(zip(variants, runs))
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
    """``(param, noskip value, skip value)`` for each training parameter the two runs differ
    in apart from ``skip``, in Config's order, then ``world_size``; values compared parsed
    (``1e-3`` is ``0.001``), shown canonical, "not logged" where a run lacks the param."""
    candidates = [f.name for f in fields(Config) if f.name not in INERT_PARAMS]
    found = []
    for name in [*candidates, names.WORLD_SIZE_PARAM]:
        if name in ONLY_WITH:
            other, value = ONLY_WITH[name]
            if all(_param_of(runs[v], other) != value for v in VARIANTS):
                continue
        values = [_param_of(runs[v], name) for v in VARIANTS]
        if values[0] != values[1]:
            found.append((name, *("not logged" if x is None else format_value(x) for x in values)))
    return found


def differences_line(found: list[tuple[str, str, str]]) -> str:
    """``the runs differ in batch_norm (noskip true, skip false), image_size (64, 32); ...``"""
    listed = ", ".join(f"{name} (noskip {a}, skip {b})" if i == 0 else f"{name} ({a}, {b})"
                       for i, (name, a, b) in enumerate(found))
    return f"the runs differ in {listed}; the comparison mixes these with the skip connections"


def params_note(found: list[tuple[str, str, str]]) -> str:
    """The summary's line on the runs' training parameters."""
    if not found:
        return "Training parameters: the same apart from skip."
    return f"**Warning**: {differences_line(found)}."


def choose_quantities(runs: dict[str, object], quantity: str = AUTO) -> list[Quantity]:
    """What to compare, checked against the norms both runs hold (their metrics)."""
    if quantity not in (None, *QUANTITY_CHOICES):  # the CLI checks it; Python callers may not
        raise ConfigError("quantity", f"{quantity!r} is not allowed; allowed: "
                                      + ", ".join(QUANTITY_CHOICES))
    held = {v: query.probe_quantities(runs[v]) for v in VARIANTS}
    for v in VARIANTS:
        if not held[v]:
            raise QueryError(f"runs: run {runs[v].info.run_id} ({v}) has no "
                             + " or ".join(f"{p}*" for p in names.METRIC_PREFIX.values())
                             + " metrics; is it a training run of this project?")
    shared = [q for q in QUANTITIES if all(q in held[v] for v in VARIANTS)]
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
                     + " and ".join(QUANTITIES[q].record for q in held[v]) for v in VARIANTS)


def shared_layers(runs: dict[str, object], wanted: list[str] | None,
                  quantities: Sequence[Quantity] = (OUTPUT,)) -> list[str]:
    """The layers both runs probed (for every quantity compared), noskip order; ``wanted``
    must be among them."""
    def probed(run) -> list[str]:
        lists = [query.probed_layers(run, q.name) for q in quantities]
        return [layer for layer in lists[0] if all(layer in other for other in lists[1:])]
    per_run = {v: probed(r) for v, r in runs.items()}
    first = per_run["noskip"]
    shared = [layer for layer in first if all(layer in ls for ls in per_run.values())]
    if not shared:
        raise QueryError("layers: the two runs share no probed layer ("
                         + "; ".join(f"{v}: {', '.join(ls)}" for v, ls in per_run.items()) + ")")
    if wanted:
        missing = [layer for layer in wanted if layer not in shared]
        if missing:
            raise QueryError(f"layers: {', '.join(missing)} not probed in both runs; "
                             f"shared: {', '.join(shared)}")
        return [layer for layer in shared if layer in wanted]
    return shared


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
    medians = table.pivot(index="layer", columns="variant", values="median")
    ratio = (medians["skip"] / medians["noskip"]).replace([np.inf, -np.inf], np.nan)
    table["skip_over_noskip"] = table["layer"].map(ratio)
    table = table.sort_values(["depth", "variant"], kind="stable").reset_index(drop=True)
    return table, pd.concat(per_epoch, ignore_index=True)


def panel_layers(layers: list[str], cap: int = PANEL_CAP) -> list[str]:
    """At most ``cap`` of ``layers``, evenly spaced across depth, the first and last always
    among them (input side and head: where skips matter most, and the reference)."""
    if len(layers) <= cap:
        return list(layers)
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, cap)).astype(int))
    return [layers[i] for i in picks]


def read_differences(runs: dict[str, object], layers: list[str] | None,
                     quantities: Sequence[Quantity] = (OUTPUT,)) -> dict[str, tuple]:
    """``{quantity name: (plots.Difference, "")}`` from both runs' ``gradients/norms.npz``
    (read once for all quantities), or ``(None, reason)`` where it cannot be drawn. Never
    raises: the heatmap is an extra, and a run without the dense record (trained before it
    existed) still compares on its metrics."""
    dense, missing = {}, []
    for variant in VARIANTS:
        run_id = runs[variant].info.run_id
        try:
            dense[variant] = query.dense_norms(run_id)
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
    for variant in VARIANTS:
        if key not in dense[variant]:
            run = runs[variant]
            return None, (f"run {run.info.run_id} ({variant}) was trained with "
                          f"probe={run.data.params.get('probe', names.OUTPUT)}: its "
                          f"{names.NORMS_NPZ} has no {quantity.name}-gradient norms")
    try:
        found = plots.difference_matrix(dense["noskip"], dense["skip"], layers, key=key)
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
        lines.append(f"- `{quantity.difference_plot}`: log10(skip norm) - log10(noskip norm) "
                     f"for {len(difference.layers)} layers x {difference.steps} shared batches"
                     + (f" (a column is the mean of {difference.per_column} batches)"
                        if difference.per_column > 1 else "")
                     + ("; zero (or non-finite) norms, noskip: "
                        f"{difference.floored['noskip']}, skip: {difference.floored['skip']}, "
                        f"are floored at 1e{difference.floor:g}, one decade below the smallest "
                        "positive norm of either run." if any(difference.floored.values())
                        else "; neither run has a zero norm."))
    else:
        lines.append(f"- `{quantity.difference_plot}` not drawn: {skipped}.")
    return lines


def _g(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def diagnosis(table: pd.DataFrame, per_epoch: pd.DataFrame) -> list[str]:
    """Plain-language findings: the input-side layer, and any layer whose status worsened
    from the first epoch to a later one (the collapse a median hides)."""
    first = table[table["depth"] == table["depth"].min()].set_index("variant")
    layer = first["layer"].iloc[0]
    found = [f"- Input-side layer `{layer}`: median {_g(first.loc['noskip', 'median'])} without "
             f"skips ({first.loc['noskip', 'status']}), {_g(first.loc['skip', 'median'])} with "
             f"skips ({first.loc['skip', 'status']}); skip/noskip = "
             f"{_g(first.loc['skip', 'skip_over_noskip'])}."]
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
    lines = [f"## {quantity.heading}: skip vs no skip", "", *([params, ""] if params else []),
             *diagnosis(table, per_epoch), "",
             *([*figures, ""] if figures else []),
             "| layer | variant | median | min | max | first | last | early | late | zero steps "
             "| skip/noskip | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table.itertuples():
        lines.append(f"| `{r.layer}` | {r.variant} | {g(r.median)} | {g(r.min)} | {g(r.max)} | "
                     f"{g(r.first)} | {g(r.last)} | {g(r.early_median)} | {g(r.late_median)} | "
                     f"{r.zero_fraction:.0%} | {g(r.skip_over_noskip)} | {r.status} |")
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
            quantity: str = AUTO) -> str:
    """Run the compare step; returns the compare run's ID. Raises QueryError on bad input
    (ConfigError for a ``quantity`` that is not auto, output, weight or both)."""
    # --- 1. choose and read everything before a run is opened ------------------------
    runs = select_runs(experiment, run_ids)
    quantities = choose_quantities(runs, quantity)
    chosen = shared_layers(runs, layers, quantities)
    panels = panel_layers(chosen)
    differences = read_differences(runs, chosen if layers else None, quantities)
    # Not refused: comparing other settings can be deliberate; but never silent.
    differing = differing_params(runs)
    if differing:
        click.echo(f"compare: warning: {differences_line(differing)}", err=True)
    parts = []
    for q in quantities:
        sides = [Side.read(v, runs[v], chosen, q.name) for v in VARIANTS]
        table, per_epoch = summarize(sides)
        difference, skipped = differences[q.name]
        text = markdown(table, per_epoch, sides,
                        figure_notes(chosen, panels, difference, skipped, q), q,
                        params_note(differing))
        parts.append(Part(q, sides, table, per_epoch, difference, skipped, text))

    # --- 2. the compare run --------------------------------------------------------------
    model = runs["noskip"].data.params.get("model", "model")
    ids = {v: runs[v].info.run_id for v in VARIANTS}
    # The compare run goes into the experiment it read from: the named one, or that of
    # the given runs (under `mlflow run` the run already exists, where `mlflow run` put it).
    if run_ids and experiment in (None, AUTO):
        experiment_id = runs["noskip"].info.experiment_id
    else:
        experiment_id = query.experiment_id(experiment)
    tracker = Tracker.start(f"compare-{model}", params or {}, {
        "compare.runs": ",".join(ids.values()),
        "compare.noskip_run": ids["noskip"], "compare.skip_run": ids["skip"],
        "compare.layers": ",".join(chosen),
        names.PANEL_LAYERS_TAG: ",".join(panels),
        names.QUANTITY_TAG: "both" if len(parts) > 1 else parts[0].quantity.name,
        names.DIFFERING_PARAMS_TAG: ",".join(name for name, _, _ in differing) or "none",
        **{p.quantity.difference_tag: "logged" if p.difference is not None
           else f"skipped: {p.skipped}" for p in parts},
    }, experiment_id=experiment_id)
    with tracker.ending():
        per_epoch_steps = int(runs["noskip"].data.tags.get(names.STEPS_PER_EPOCH_TAG, 0)) or None
        for part in parts:
            _log_part(tracker, part, runs, chosen, panels, model, per_epoch_steps, differing)
        # Each summary.md states the params on its own; the description says it once.
        said = f"{params_note(differing)}\n\n"
        tracker.set_note("\n".join([parts[0].text, *(p.text.replace(said, "", 1)
                                                      for p in parts[1:])]),
                         tuple(part.quantity.summary_md for part in parts))
    return tracker.run_id


def _log_part(tracker: Tracker, part: Part, runs: dict[str, object], chosen: list[str],
              panels: list[str], model: str, per_epoch_steps: int | None,
              differing: list[tuple[str, str, str]] = ()) -> None:
    """One quantity's figures and tables onto the compare run."""
    q, difference = part.quantity, part.difference
    histories = {s.variant: s.chosen_history for s in part.sides}
    note = (f"{len(panels)} of {len(chosen)} layers, evenly across depth; every layer is in "
            f"the tables{' and ' + q.difference_plot if difference is not None else ''}"
            if len(panels) < len(chosen) else None)
    figures = [(lambda: plots.comparison_norms(histories, panels, model, note, q.label),
                q.norms_plot),
               (lambda: plots.depth_profile(part.table, model, q.label), q.depth_plot)]
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
    tracker.log_dict({"quantity": q.name, "runs": {v: runs[v].info.run_id for v in VARIANTS},
                      "layers": chosen, "panel_layers": panels,
                      "differing_params": [{"param": n, "noskip": a, "skip": b}
                                           for n, a, b in differing],
                      "summary": _records(part.table), "per_epoch": _records(part.per_epoch)},
                     q.summary_json)


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe rows: NaN becomes null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]
