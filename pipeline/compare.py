"""The compare step: two runs in, the answer out (plots, tables, a diagnosis, report.html),
on a compare run of its own (docs: guide/compare.md).

A skip and a noskip training run keep the skip connections' words; any other two runs with
gradient norms (``pipeline.watch`` runs of a user's own networks too) are labelled by name or
by a param, and runs of different networks are compared layer by layer in depth order.
``quantity`` picks the norms: output (``grad_norm/*``), weight (``weight_grad_norm/*``),
both, or auto. The statistics and words are ``summary``'s, the status rule ``health``'s.
"""
from __future__ import annotations

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
from .health import decades
from .param_diff import (VARIANTS, differences_line, differing_params, is_skip_pair,
                         params_note)
from .summary import diagnosis, figure_notes, markdown, panel_layers, summarize, records
from .config import (AUTO, QUANTITIES as QUANTITY_CHOICES, ConfigError)
from .query import QueryError
from .tracking import Tracker, public_uri

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
    differing = differing_params(runs, None if label in LABEL_BY else label)
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
            out[names.COMPARE_DECADES[part.quantity.name](str(layer))] = decades(
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
                      "summary": records(part.table), "per_epoch": records(part.per_epoch)},
                     q.summary_json)
