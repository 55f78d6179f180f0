"""The `sweep` step: train a grid of models x skip x batch_norm, then plot each network's
first-layer gradient norm against its depth.

Every cell is a training run, reused when a FINISHED run of the experiment has the same
parameters and code (``query.find_reusable``, as `all` does; ``force`` retrains). Fresh
runs are children of the sweep's parent run (``mlflow.parentRunId``) and carry their cell in
``sweep.cell``; the parent names every cell's run in its tags and holds the figure and the
table (``names``, "Sweep"). A model without skips (vgg19) has no skip=true cell.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd

from . import console, device_data, distributed, names, plots, query, report_html, tracking, train
from .config import (SWEEP_GRID_FIELDS, Config, SweepConfig, UserError, cell_name,
                     to_params)
from .models import VARIANTS
from .tracking import Tracker, public_uri

# The figure's x axis: each model's number of weight layers, as in its name.
DEPTH = {name: variant.depth for name, variant in VARIANTS.items()}
# Seconds a parallel training process gets to end its run (KILLED) after SIGTERM.
STOP_GRACE_S = 60


class SweepError(UserError, RuntimeError):
    """Cells whose training failed; the finished ones are reused when the sweep runs again."""


@dataclasses.dataclass
class Cell:
    cfg: Config
    run_id: str | None = None
    reused: bool = False
    exit_code: int | None = None   # a training process that failed (parallel)

    @property
    def name(self) -> str:
        return cell_name(self.cfg.model, self.cfg.skip, self.cfg.batch_norm)


def run_sweep(cfg: Config, opts: SweepConfig) -> str:
    """Returns the sweep's parent run ID. ``cfg``: the training parameters every cell shares
    (its model, skip and batch_norm are replaced by the grid's)."""
    configs, skipped = opts.cells(cfg)  # refuses a bad grid before any work
    cells = [Cell(c) for c in configs]
    params = {k: v for k, v in to_params(cfg).items() if k not in SWEEP_GRID_FIELDS}
    params.update(to_params(opts))
    experiment_id = tracking.use_experiment(cfg.experiment)
    parent = Tracker.start("sweep", params, {
        names.STEP_TAG: "sweep",
        names.SWEEP_CELLS_TAG: ",".join(c.name for c in cells),
        names.SWEEP_SKIPPED_TAG: ",".join(skipped) or "none",
    }, experiment_id=experiment_id)
    with parent.ending():
        for cell in cells:
            cell.run_id = None if opts.force else query.find_reusable(cell.cfg)
            cell.reused = cell.run_id is not None
            if cell.reused:
                parent.set_tags(_cell_tags(cell))
        todo = [c for c in cells if not c.reused]
        click.echo(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} reused (FINISHED runs "
                   f"with the same parameters and code; -P force=true retrains), {len(todo)} "
                   f"to train" + (f", {opts.parallel} at a time" if opts.parallel > 1 else ""),
                   err=True)
        if opts.parallel > 1:
            _train_in_processes(todo, parent, experiment_id, opts.parallel)
        else:
            with device_data.keep_prepared():  # the cells share the data: prepare it once
                for i, cell in enumerate(todo, 1):
                    click.echo(f"sweep: training {cell.name} ({i}/{len(todo)})", err=True)
                    try:
                        cell.run_id = train.run(cell.cfg, tags={names.SWEEP_CELL_TAG: cell.name})
                    except Exception:
                        click.echo(f"sweep: {cell.name} failed; run the sweep again to train "
                                   "what is missing (finished cells are reused)", err=True)
                        raise
                    parent.set_tags(_cell_tags(cell))
        parent.set_tags({names.SWEEP_RUNS_TAG: ",".join(c.run_id for c in cells),
                         names.SWEEP_REUSED_TAG: f"{sum(c.reused for c in cells)}/{len(cells)}"})

        table = summarize(cells)
        fig = plots.first_layer_vs_depth(table, describe_training(cfg))
        try:
            parent.log_figure(fig, names.SWEEP_FIGURE)
        finally:
            plots.close(fig)
        text = markdown(table, skipped)
        parent.log_text(text, names.SWEEP_SUMMARY_MD)
        parent.log_text(report_html.sweep_report(table, skipped=skipped,
                                                 description=describe_training(cfg),
                                                 run_id=parent.run_id), names.REPORT_HTML)
        parent.log_text(table.to_csv(index=False), names.SWEEP_SUMMARY_CSV)
        parent.log_dict({"cells": _records(table), "skipped": skipped}, names.SWEEP_SUMMARY_JSON)
        parent.set_note(text, (names.SWEEP_SUMMARY_MD,))
    console.say([*console.sweep_lines(table.to_dict(orient="records"),
                                      console.colour_on(sys.stdout)),
                 *console.how_to_open(public_uri(mlflow.get_tracking_uri()), experiment_id,
                                      parent.run_id)])
    return parent.run_id


def _cell_tags(cell: Cell) -> dict[str, str]:
    return {names.sweep_run_tag(cell.name): cell.run_id,
            names.sweep_reused_tag(cell.name): str(cell.reused).lower()}


# --- several cells at once -------------------------------------------------------------------
def _train_in_processes(cells: list[Cell], parent: Tracker, experiment_id: str,
                        parallel: int) -> None:
    """Train ``cells``, up to ``parallel`` `python -m pipeline train` processes at a time.

    Each process starts its own run (MLFLOW_RUN_ID unset, or it would attach to this one);
    MLflow's MLFLOW_RUN_CONTEXT adds the parent and cell tags to it. The first failure
    starts no further cell; those running finish, then SweepError names the failures.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
    # The same tracking store and experiment as this process (`auto` resolves the ID first),
    # and the same code: a child importing another copy of the package would log another
    # code_version, and never be reused.
    package_root = str(Path(__file__).resolve().parents[1])
    env.update(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_EXPERIMENT_ID=experiment_id,
               PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p))
    waiting, running, failed = list(cells), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < parallel and not failed:
                cell = waiting.pop(0)
                context = {"mlflow.parentRunId": parent.run_id, names.SWEEP_CELL_TAG: cell.name}
                args = distributed.train_argv(to_params(cell.cfg))
                click.echo(f"sweep: starting {cell.name}", err=True)
                # An argument list, no shell: parameter values are never parsed by one.
                running[subprocess.Popen(args, env={**env, "MLFLOW_RUN_CONTEXT":
                                                    json.dumps(context)})] = cell
            time.sleep(0.5)
            for proc, cell in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[proc]
                if proc.returncode != 0:
                    failed.append(cell)
                    cell.exit_code = proc.returncode
                    continue
                cell.run_id = _child_run(cell, parent.run_id, experiment_id)
                parent.set_tags(_cell_tags(cell))
    except BaseException:
        _stop(running)
        raise
    if failed:
        not_started = f"; {len(waiting)} not started" if waiting else ""
        failed.sort(key=cells.index)  # in grid order, not in the order they happened to end
        named = ", ".join(f"{c.name} (exit code {c.exit_code})" for c in failed)
        raise SweepError(f"sweep: {len(failed)} cell(s) failed: {named}"
                         f"{not_started}; their output is above. Run the sweep again to train "
                         "what is missing (finished cells are reused)")


def _stop(running: dict) -> None:
    """SIGTERM: each training process ends its run KILLED, after its last checkpoint."""
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def _child_run(cell: Cell, parent_id: str, experiment_id: str) -> str:
    """The FINISHED run a training process made for ``cell`` under ``parent_id``."""
    found = query.find_runs(experiment_id, status="FINISHED", skip=cell.cfg.skip,
                            model=cell.cfg.model)
    for _, row in found.iterrows():
        if (row.get(f"tags.{names.SWEEP_CELL_TAG}") == cell.name
                and row.get("tags.mlflow.parentRunId") == parent_id):
            return row["run_id"]
    raise SweepError(f"sweep: the training process of {cell.name} exited 0, but no FINISHED "
                     f"run of it under the sweep run {parent_id} was found")


# --- the summary -------------------------------------------------------------------------------
def summarize(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: the first probed layer's norms over every step of its run."""
    rows = []
    for cell in cells:
        run = query.get_run(cell.run_id)
        first = query.probed_layers(run)[0]
        norms = query.gradient_history(cell.run_id, [first])["norm"].to_numpy(np.float64)
        finite = norms[np.isfinite(norms)]
        p10, median, p90 = (np.percentile(finite, [10, 50, 90]) if len(finite)
                            else (math.nan,) * 3)
        rows.append({
            "cell": cell.name, "model": cell.cfg.model, "depth": DEPTH[cell.cfg.model],
            "skip": cell.cfg.skip, "batch_norm": cell.cfg.batch_norm, "layer": first,
            "steps": len(norms), "median": float(median), "p10": float(p10),
            "p90": float(p90), "zero_fraction": float(np.mean(norms == 0)) if len(norms) else math.nan,
            "health": run.data.tags.get(names.HEALTH_TAG, ""),
            "test_accuracy": run.data.metrics.get(names.TEST_ACCURACY, math.nan),
            "run_id": cell.run_id, "reused": cell.reused,
        })
    return pd.DataFrame(rows)


def describe_training(cfg: Config) -> str:
    """The figure's subtitle: what every cell trained on, and for how long."""
    length = (f"{cfg.max_steps} steps" if cfg.max_steps
              else f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}")
    return f"{cfg.dataset}, {cfg.image_size} px, {length}"


def _g(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def _lines(table: pd.DataFrame) -> list[str]:
    """For each (skip, batch_norm): the stem's median at the shallowest and deepest ResNet."""
    out = []
    resnets = table[table["model"].str.startswith("resnet")]
    for (skip, batch_norm), rows in resnets.groupby(["skip", "batch_norm"], sort=True):
        if len(rows) < 2:
            continue
        rows = rows.sort_values("depth")
        a, b = rows.iloc[0], rows.iloc[-1]
        label = (f"{'with' if skip else 'without'} skip, "
                 f"{'BatchNorm' if batch_norm else 'no BatchNorm'}")
        change = ""
        if a["median"] > 0 and b["median"] > 0:
            decades = math.log10(a["median"] / b["median"])
            change = f": {abs(decades):.1f} decades {'lower' if decades > 0 else 'higher'}"
        elif b["median"] == 0:
            change = ": dead (median exactly 0)"
        out.append(f"- {label}: {_g(a['median'])} at depth {a['depth']} ({a['model']}), "
                   f"{_g(b['median'])} at depth {b['depth']} ({b['model']}){change}")
    return out


def markdown(table: pd.DataFrame, skipped: list[str]) -> str:
    """The parent run's description and ``sweep/summary.md``."""
    reused = int(table["reused"].sum())
    lines = ["## First-layer gradient norm against depth", "",
             "Median (and 10th/90th percentile) over the training steps of the L2 norm of "
             "dLoss/d(output of each network's first probed layer, the stem); "
             f"`{names.SWEEP_FIGURE}` draws it.", "", *_lines(table)]
    if skipped:
        lines.append(f"- left out: {', '.join(skipped)} (no skip connections to switch on)")
    lines.append(f"- {reused} of {len(table)} cells reused a FINISHED run with the same "
                 "parameters and code (force=true retrains)")
    lines += ["", "| cell | depth | first layer | steps | median | p10 | p90 | zero steps "
                  "| health | test acc | run |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['cell']} | {r['depth']} | `{r['layer']}` | {r['steps']} "
                     f"| {_g(r['median'])} | {_g(r['p10'])} | {_g(r['p90'])} "
                     f"| {_pct(r['zero_fraction'])} | {r['health'] or '-'} "
                     f"| {_g(r['test_accuracy'])} | `{r['run_id']}`"
                     f"{' (reused)' if r['reused'] else ''} |")
    return "\n".join(lines) + "\n"


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe rows: NaN becomes null, numpy scalars plain Python."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else
                 v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]
