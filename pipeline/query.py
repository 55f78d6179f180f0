"""The project's only reader of MLflow: find runs, read gradient histories.

    from pipeline import query
    runs = query.find_runs(skip=False)              # DataFrame, newest first
    hist = query.gradient_history(runs.run_id[0])   # columns: step, layer, norm, epoch

Works against any tracking URI MLflow resolves (``MLFLOW_TRACKING_URI`` or the default
``sqlite:///mlflow.db``).
"""
from __future__ import annotations

import difflib
import os
import tempfile

# Reading one small JSON artifact should not draw a download progress bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import code_version, names
from .config import (AUTO, DEFAULT_EXPERIMENT, Config, ConfigError, UserError, fields,
                     format_value, parse_bool, parse_field)


class QueryError(UserError, LookupError):
    """Runs or metrics that are not there."""


def experiment_ref(experiment: str | None = None) -> str:
    """What ``auto`` (or None) means, as a name or ID: under `mlflow run`, the experiment of
    the run it opened; else MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME; else gradient-flow.
    Any other value is returned as given."""
    if experiment not in (None, AUTO):
        return experiment
    pending = os.environ.get("MLFLOW_RUN_ID")
    if pending:
        return MlflowClient().get_run(pending).info.experiment_id
    return (os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            or DEFAULT_EXPERIMENT)


def find_experiment(experiment: str | None = None):
    """The experiment ``experiment`` names (see ``experiment_ref``), or None if absent."""
    ref = experiment_ref(experiment)
    client = MlflowClient()
    found = client.get_experiment_by_name(ref)
    if found is None and ref.isdigit():
        try:
            found = client.get_experiment(ref)
        except MlflowException:
            found = None
    return found


def experiment_id(experiment: str | None = None) -> str:
    """The ID of an existing experiment, by name or ID; by default (None or ``auto``) the
    one this project logs to (``experiment_ref``)."""
    found = find_experiment(experiment)
    if found is None:
        raise QueryError(f"experiment: {experiment_ref(experiment)!r} does not exist in "
                         f"{mlflow.get_tracking_uri()}; train a run first, or name another")
    return found.experiment_id


_FIELDS = {f.name: f for f in fields(Config)}


def param_value(name: str, raw) -> object:
    """What a logged param stands for: its value parsed as training parses it (``1e-3`` and
    ``0.001`` are one learning rate, ``yes`` and ``true`` one boolean), else the stripped
    string (a param this version does not know, or a value it no longer accepts)."""
    text = format_value(raw).strip()
    try:
        if name in _FIELDS:
            return parse_field(_FIELDS[name], text)
        if name == names.WORLD_SIZE_PARAM:
            return int(text)
    except (ConfigError, ValueError):
        pass
    return text


def find_runs(experiment: str | None = None, status: str | None = None,
              **param_filters) -> pd.DataFrame:
    """Training runs with their params, tags and final metrics, newest first.

    ``param_filters`` match params by their parsed value (``param_value``): ``lr=0.001``,
    ``lr="1e-3"`` and a run started with ``mlflow run -P lr=1e-3`` (which stores the param
    as typed) all match. ``skip`` is matched through the ``variant`` tag, because ``mlflow
    run`` stores ``-P skip=...`` exactly as typed (``yes``, ``1``, ...).
    """
    clauses = []
    if status:
        clauses.append(f"attributes.status = '{status}'")
    wanted = {}
    for key, value in param_filters.items():
        if key == "skip":
            variant = "skip" if parse_bool("skip", format_value(value)) else "noskip"
            clauses.append(f"tags.`{names.VARIANT_TAG}` = '{variant}'")
        else:
            # Not a filter clause: the store compares strings, and `1e-3` is not `0.001`.
            wanted[key] = param_value(key, value)
    runs = mlflow.search_runs(experiment_ids=[experiment_id(experiment)],
                              filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"])
    variant = f"tags.{names.VARIANT_TAG}"
    if variant not in runs:  # no training run at all (an empty experiment, or compare runs only)
        return runs.iloc[0:0]
    keep = runs[variant].notna()  # training runs only
    for key, want in wanted.items():
        column = f"params.{key}"
        if column not in runs:
            if key not in _FIELDS and key != names.WORLD_SIZE_PARAM:
                # No run has it and this version does not know it: a misspelt filter, which
                # would otherwise read as "no such run yet". (Runs of an older version that
                # logged a param since removed can still be filtered on it.)
                close = difflib.get_close_matches(key, [*_FIELDS, names.WORLD_SIZE_PARAM], n=1)
                raise QueryError(f"{key}: not a parameter of a training run"
                                 + (f"; did you mean {close[0]}?" if close else "")
                                 + " (allowed: the parameters in docs/guide/parameters.md,"
                                   " and world_size)")
            return runs.iloc[0:0]
        # Each distinct string parsed once: runs repeat the same few values.
        matches = {raw: param_value(key, raw) == want for raw in runs[column].dropna().unique()}
        keep &= runs[column].map(lambda raw: matches.get(raw, False)).astype(bool)
    return runs[keep].reset_index(drop=True)


def find_reusable(cfg: Config) -> str | None:
    """The newest FINISHED run with exactly ``cfg`` and this code, or None."""
    found = find_runs(cfg.experiment, status="FINISHED", skip=cfg.skip, model=cfg.model)
    params = [f.name for f in fields(Config)]
    for _, row in found.iterrows():
        if row.get(f"tags.{names.CODE_VERSION_TAG}") != code_version():
            continue
        logged = {name: row.get(f"params.{name}") for name in params}
        try:
            # Compare parsed values, not strings: `-P lr=1e-3` and `--lr 0.001` are one run.
            if Config.from_strings({k: v for k, v in logged.items() if isinstance(v, str)}) == cfg:
                return row["run_id"]
        except ConfigError:
            continue  # a run from an older parameter set: never a match
    return None


def get_run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise QueryError(f"runs: no run with ID {run_id!r} in {mlflow.get_tracking_uri()}") from None


def experiment_of(run_id: str):
    """The experiment run ``run_id`` belongs to."""
    return MlflowClient().get_experiment(get_run(run_id).info.experiment_id)


def probe_quantities(run) -> list[str]:
    """What the run's probes measured, judged by its metrics: ``output`` (``grad_norm/*``)
    and/or ``weight`` (``weight_grad_norm/*``), in that order; empty for other runs."""
    return [q for q, prefix in names.METRIC_PREFIX.items()
            if any(k.startswith(prefix) for k in run.data.metrics)]


def probed_layers(run, quantity: str = names.OUTPUT) -> list[str]:
    """The run's probed layers, input side first (the order of its ``layers.resolved`` tag,
    else of its ``layers`` param, which may be ``auto``), among those with metrics of
    ``quantity`` (``output``: ``grad_norm/*``; ``weight``: ``weight_grad_norm/*``).

    Raises QueryError for a run without such metrics (naming the ``quantity`` it does
    hold, if any), ConfigError for a ``quantity`` other than ``output`` or ``weight``.
    """
    if quantity not in names.METRIC_PREFIX:
        raise ConfigError("quantity", f"{quantity!r} is not allowed; allowed: "
                                      + ", ".join(names.METRIC_PREFIX))
    prefix = names.METRIC_PREFIX[quantity]
    logged = {names.layer_of(k, prefix) for k in run.data.metrics if k.startswith(prefix)}
    if not logged:
        others = [q for q in probe_quantities(run) if q != quantity]
        if others:  # trained with another probe: say which, and how to read what it holds
            raise QueryError(f"runs: run {run.info.run_id} has no {prefix}* metrics: it was "
                             f"trained with probe={others[0]} and holds "
                             f"{names.METRIC_PREFIX[others[0]]}*; read those with "
                             f"quantity={others[0]!r}")
        raise QueryError(f"runs: run {run.info.run_id} has no {prefix}* metrics; "
                         "is it a training run of this project?")
    listed = run.data.tags.get(names.LAYERS_RESOLVED_TAG) or run.data.params.get("layers", "")
    order = [layer for layer in listed.split(",") if layer in logged]
    return order + sorted(logged - set(order))


def gradient_history(run_id: str, layers: list[str] | None = None,
                     quantity: str = names.OUTPUT) -> pd.DataFrame:
    """Every logged gradient norm of a run: one row per (step, layer), in step order;
    ``quantity`` picks the metrics (``output``: ``grad_norm/*``, ``weight``:
    ``weight_grad_norm/*``).

    ``epoch`` is ``step // steps_per_epoch`` (a tag the training run records). Reads with
    ``MlflowClient.get_metric_history``, which pages through the store's results.
    """
    run = get_run(run_id)
    available = probed_layers(run, quantity)
    if layers is None:
        layers = available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise QueryError(f"layers: run {run_id} has no metric for {', '.join(missing)}; "
                         f"it has: {', '.join(available)}")
    client = MlflowClient()
    frames = []
    for layer in layers:
        points = client.get_metric_history(run_id, names.METRIC_KEY[quantity](layer))
        steps = np.fromiter((p.step for p in points), dtype=np.int64, count=len(points))
        norms = np.fromiter((p.value for p in points), dtype=np.float64, count=len(points))
        frames.append(pd.DataFrame({"step": steps, "layer": layer, "norm": norms}))
    history = pd.concat(frames, ignore_index=True)
    history["layer"] = pd.Categorical(history["layer"], categories=layers, ordered=True)
    per_epoch = int(run.data.tags.get(names.STEPS_PER_EPOCH_TAG, 0)) or None
    history["epoch"] = history["step"] // per_epoch if per_epoch else 0
    return history.sort_values(["step", "layer"], kind="stable").reset_index(drop=True)


def run_config(run_id: str) -> dict[str, str]:
    """The ``params`` of a run's ``config.json`` artifact: what ``rerun`` trains again."""
    get_run(run_id)
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{names.CONFIG_JSON}")["params"]
    except (MlflowException, OSError, KeyError):
        raise QueryError(f"runs: run {run_id} has no {names.CONFIG_JSON} artifact; only training "
                         "runs made by this version can be rerun") from None


def metric_histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) the run holds, by metric key (system metrics left out)."""
    client = MlflowClient()
    keys = [k for k in get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def dense_norms(run_id: str) -> dict[str, np.ndarray] | None:
    """A run's ``gradients/norms.npz`` (schema: docs guide/run-logs.md): ``steps``,
    ``layers``, ``loss`` and ``norms`` and/or ``weight_norms`` (by the run's ``probe``) as
    numpy arrays; None when the run has no such artifact
    (runs from before the dense record, or not training runs).

    Reads through MLflow's artifact API, so it works against a server with proxied
    artifacts as well as a local store. A full default run's norms are 13.5 MB of float64
    (54 layers x 31,250 steps): one download, held in memory once.
    """
    get_run(run_id)
    folder = os.path.dirname(names.NORMS_NPZ)
    try:
        listed = {f.path for f in MlflowClient().list_artifacts(run_id, folder)}
    except (MlflowException, OSError):
        return None
    if names.NORMS_NPZ not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=names.NORMS_NPZ,
                                                    dst_path=tmp)
        with np.load(local, allow_pickle=False) as npz:  # the schema holds no objects
            return {key: npz[key] for key in npz.files}  # norms and/or weight_norms (probe)


def final_metrics(run) -> dict[str, float]:
    """The last value of each per-epoch metric, as shown in the UI's run table."""
    keys = (names.TRAIN_ACCURACY, names.TRAIN_LOSS, names.TEST_ACCURACY, names.TEST_LOSS)
    return {k: run.data.metrics.get(k, float("nan")) for k in keys}


__all__ = ["QueryError", "experiment_id", "experiment_ref", "find_experiment", "find_runs",
           "param_value", "find_reusable", "get_run", "experiment_of", "run_config", "probe_quantities", "probed_layers",
           "gradient_history", "final_metrics", "metric_histories", "dense_norms"]
