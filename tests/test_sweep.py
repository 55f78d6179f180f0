"""The `sweep` step: a grid of training runs under one parent, and the first-layer figure.

The default tests train one small grid in-process once per module (resnet18 with and
without skips, vgg19 without: 3 cells, the vgg19 skip cell left out) on tiny synthetic
data, and check a copy of that store for reuse and force. The slow tests run the done-when
command (`mlflow run . -e sweep`, the full default grid) and the parallel option.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import config, names
from pipeline.config import Config, ConfigError, SweepConfig
from runs_helpers import (REPO_ROOT, TINY_TRAIN, Store, deactivate_store, describe, new_store,
                          run_mlflow)
from runs_helpers import run_pipeline as run_in_store
from conftest import describe_process, run_pipeline

# data_path=device on the CPU: the cells share one prepared copy of the data.
TINY = dict(TINY_TRAIN, epochs=1, max_steps=4, data_path="device")
GRID = dict(models="resnet18,vgg19", skips="false,true", batch_norms="false")
CELLS = ["resnet18-noskip-nobn", "resnet18-skip-nobn", "vgg19-noskip-nobn"]
FIELD_NAMES = {f.name for f in config.fields()}


def _runs(store: Store) -> dict:
    client = store.client
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r for r in client.search_runs(exps, max_results=1000)}


def _training(runs: dict) -> set[str]:
    return {i for i, r in runs.items() if "variant" in r.data.tags}


def _sweep(force: bool = False, **grid) -> str:
    from pipeline import sweep
    return sweep.run_sweep(Config(**TINY), SweepConfig(**{**GRID, **grid}, force=force))


# --- the grid, before any work --------------------------------------------------------------
BAD_GRIDS = [
    (dict(models="resnet18,resnet9"), "models", "resnet9"),
    (dict(models=" , "), "models", "empty"),
    (dict(skips="false,maybe"), "skips", "maybe"),
    (dict(batch_norms="on"), "batch_norms", "on"),
    (dict(models="vgg19", skips="true"), "skips", "vgg19"),
]


@pytest.mark.parametrize("grid, param, mention", BAD_GRIDS,
                         ids=[f"{p}={list(g.values())[-1]}" for g, p, _ in BAD_GRIDS])
def test_a_bad_grid_value_is_refused_in_one_line_naming_the_parameter_and_the_allowed_values(
        grid, param, mention):
    with pytest.raises(ConfigError) as e:
        config.parse(SweepConfig, grid).cells(Config())
    line = str(e.value)
    assert e.value.param == param and line.startswith(f"{param}: "), line
    assert "\n" not in line and mention in line and "allowed" in line, line


@pytest.mark.parametrize("train, param", [(dict(layers=("conv1", "fc")), "layers"),
                                          (dict(resume="abc"), "resume"),
                                          (dict(probe="weight"), "probe")])
def test_layer_names_resume_and_weight_only_probes_are_refused_for_a_sweep(train, param):
    with pytest.raises(ConfigError) as e:
        SweepConfig().cells(Config(**train))
    assert e.value.param == param and "\n" not in str(e.value)


def test_the_command_line_refuses_a_bad_grid_with_exit_2_and_no_run(tracking_store):
    proc = run_pipeline(["sweep", "--models", "resnet18,resnet9", "--dataset", "synthetic"],
                        cwd=tracking_store.dir, store=tracking_store)
    assert proc.returncode == 2, describe_process(proc)
    assert proc.stderr.strip().splitlines() == [
        "error: models: 'resnet9' is not allowed; allowed: comma-separated resnet18, resnet34, "
        "resnet50, resnet101, resnet152, vgg19"], describe_process(proc)
    assert not (tracking_store.dir / "mlflow.db").exists()


def test_the_default_grid_is_every_model_skip_and_batch_norm_without_vgg19_skip_cells():
    cells, skipped = SweepConfig().cells(Config())
    assert len(cells) == 22
    assert skipped == ["vgg19-skip-nobn", "vgg19-skip-bn"]
    assert [config.cell_name(c.model, c.skip, c.batch_norm) for c in cells[:4]] == [
        "resnet18-noskip-nobn", "resnet18-noskip-bn", "resnet18-skip-nobn", "resnet18-skip-bn"]


def test_grid_values_are_normalised_and_deduplicated_and_the_base_config_passes_through():
    base = Config(**TINY)
    cells, skipped = SweepConfig(models="ResNet18, resnet18", skips="no,0,YES",
                                 batch_norms="1").cells(base)
    assert cells == [dataclasses.replace(base, model="resnet18", skip=s, batch_norm=True)
                     for s in (False, True)]
    assert skipped == []


def test_every_model_has_a_depth():
    from pipeline.sweep import DEPTH
    assert set(DEPTH) == set(config.MODELS)


# --- MLproject ----------------------------------------------------------------------------------
SWEEP_FIELDS = [f.name for f in config.fields(SweepConfig)]
TRAIN_FIELDS = [f.name for f in config.fields() if f.name not in config.SWEEP_GRID_FIELDS]


@pytest.fixture(scope="module")
def sweep_entry() -> dict:
    with open(REPO_ROOT / "MLproject") as fh:
        return yaml.safe_load(fh)["entry_points"]["sweep"]


def test_mlproject_sweep_declares_every_training_parameter_but_the_grid_with_config_defaults(
        sweep_entry):
    declared = sweep_entry["parameters"]
    assert set(declared) == set(TRAIN_FIELDS) | set(SWEEP_FIELDS)
    fields = {f.name: f for f in (*config.fields(), *config.fields(SweepConfig))}
    yaml_type = {"int": "int", "float": "float"}
    for name, spec in declared.items():
        default = config.SWEEP_TRAIN_DEFAULTS.get(name, fields[name].default)
        assert str(spec["default"]) == config.format_value(default), name
        assert spec.get("type", "string") == yaml_type.get(fields[name].type, "string"), name


def test_mlproject_sweep_command_passes_every_declared_parameter_as_its_option(sweep_entry):
    from pipeline.cli import sweep
    command = " ".join(sweep_entry["command"].split())
    assert command.startswith("python -m pipeline sweep ")
    for name in sweep_entry["parameters"]:
        assert command.count(f"--{name.replace('_', '-')} {{{name}}}") == 1, name
    assert set(re.findall(r"\{(\w+)\}", command)) == set(sweep_entry["parameters"])
    cli_options = {opt for p in sweep.params for opt in p.opts}
    assert set(re.findall(r"--[a-z0-9-]+", command)) == cli_options - {"--help"}


# --- the figure -----------------------------------------------------------------------------
def test_the_figure_has_a_log_y_axis_one_line_per_skip_and_batch_norm_and_marks_dead_medians():
    from pipeline import plots
    rows = []
    for model, depth in (("resnet18", 18), ("resnet50", 50), ("resnet152", 152), ("vgg19", 19)):
        for skip in (False, True):
            for bn in (False, True):
                if skip and model == "vgg19":
                    continue
                median = 0.0 if (model == "resnet152" and not skip and not bn) else (
                    1e-3 if skip or bn else 10.0 ** -(depth / 7))
                rows.append(dict(model=model, depth=depth, skip=skip, batch_norm=bn,
                                 median=median, p10=median / 3, p90=median * 3))
    fig = plots.first_layer_vs_depth(pd.DataFrame(rows), "synthetic, 32 px, 4 steps")
    try:
        ax = fig.axes[0]
        assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert [x for x in labels if ":" not in x] == [
            "without skip, no BatchNorm", "without skip, BatchNorm", "with skip, no BatchNorm",
            "with skip, BatchNorm"]
        assert "without skip, no BatchNorm: median exactly 0 (dead)" in labels
        assert [t.get_text() for t in ax.get_xticklabels()] == [
            "18\nresnet18", "50\nresnet50", "152\nresnet152"]
        assert "vgg19" in [t.get_text() for t in ax.texts]
        fig.savefig(io.BytesIO(), format="png")
    finally:
        plots.close(fig)


# --- a sweep, end to end ------------------------------------------------------------------------
@dataclasses.dataclass
class FirstSweep:
    store: Store
    parent_id: str
    runs: dict
    checkpoints_left: list  # run folders in checkpoint_dir after the sweep


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory) -> FirstSweep:
    directory = tmp_path_factory.mktemp("sweep_store")
    with pytest.MonkeyPatch.context() as mp:
        store = new_store(directory, mp, tmp_path_factory)
        try:
            parent_id = _sweep()
        finally:
            deactivate_store()
    # The sweep deleted each finished cell's checkpoint folder (vgg19's alone is 1.6 GB).
    left = sorted(p.name for p in (directory / "checkpoints").glob("*") if p.is_dir())
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    return FirstSweep(store, parent_id, _runs(store), left)


@pytest.fixture
def again(first_sweep, tmp_path, monkeypatch, tmp_path_factory):
    """This test's own copy of the store after the first sweep, active in this process."""
    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=first_sweep.store.dir)
    yield store
    deactivate_store()
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)


def test_a_sweep_trains_each_grid_cell_as_a_child_of_one_parent_run(first_sweep):
    runs, pid = first_sweep.runs, first_sweep.parent_id
    parent = runs[pid]
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert tags[names.STEP_TAG] == "sweep"
    assert tags[names.SWEEP_CELLS_TAG] == ",".join(CELLS)
    assert tags[names.SWEEP_SKIPPED_TAG] == "vgg19-skip-nobn"
    assert tags[names.SWEEP_REUSED_TAG] == "0/3"
    children = {i: r for i, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == pid}
    assert set(children) == set(tags[names.SWEEP_RUNS_TAG].split(",")) == _training(runs)
    for cell, run_id in zip(CELLS, tags[names.SWEEP_RUNS_TAG].split(",")):
        run = children[run_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags[names.SWEEP_CELL_TAG] == cell
        assert tags[names.sweep_run_tag(cell)] == run_id
        assert tags[names.sweep_reused_tag(cell)] == "false"
        # The data was prepared for the first cell and read by the others.
        assert run.data.tags[names.DATA_REUSED_TAG] == str(cell != CELLS[0]).lower()
        model, variant, bn = cell.split("-")
        assert (run.data.params["model"], run.data.tags["variant"],
                run.data.params["batch_norm"]) == (model, variant, "false")
        params = {k: v for k, v in run.data.params.items() if k in FIELD_NAMES}
        assert Config.from_strings(params) == dataclasses.replace(
            Config(**TINY), model=model, skip=variant == "skip")
    assert parent.data.params["models"] == GRID["models"]
    assert "model" not in parent.data.params and parent.data.params["max_steps"] == "4"
    assert first_sweep.checkpoints_left == []  # each finished cell's checkpoint was deleted


def test_a_sweep_logs_the_figure_and_the_table_as_artifacts_and_the_run_description(first_sweep):
    client, pid = first_sweep.store.client, first_sweep.parent_id
    listed = {f.path for f in client.list_artifacts(pid, "sweep")}
    assert listed == {names.SWEEP_FIGURE, names.SWEEP_SUMMARY_MD, names.SWEEP_SUMMARY_CSV,
                      names.SWEEP_SUMMARY_JSON}
    png = client.download_artifacts(pid, names.SWEEP_FIGURE, str(first_sweep.store.dir))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(client.download_artifacts(pid, names.SWEEP_SUMMARY_CSV,
                                                  str(first_sweep.store.dir)))
    assert table["cell"].tolist() == CELLS
    assert table["depth"].tolist() == [18, 18, 19]
    assert table["layer"].tolist() == ["conv1", "conv1", "features.0"]
    assert (table["steps"] == TINY["max_steps"]).all()
    # The median is the first layer's metric history, read back independently here.
    for _, row in table.iterrows():
        history = client.get_metric_history(row["run_id"], names.grad_norm(row["layer"]))
        assert row["median"] == pytest.approx(float(np.median([p.value for p in history])),
                                              rel=1e-12)
    summary = json.loads(open(client.download_artifacts(
        pid, names.SWEEP_SUMMARY_JSON, str(first_sweep.store.dir))).read())
    assert [c["cell"] for c in summary["cells"]] == CELLS
    assert summary["skipped"] == ["vgg19-skip-nobn"]
    note = first_sweep.runs[pid].data.tags[names.NOTE_TAG]
    assert note.startswith("## First-layer gradient norm against depth")
    assert note == open(client.download_artifacts(pid, names.SWEEP_SUMMARY_MD,
                                                  str(first_sweep.store.dir))).read()
    for cell, run_id in zip(CELLS, table["run_id"]):
        assert f"| {cell} |" in note and run_id in note


def test_running_the_sweep_again_reuses_every_finished_cell(first_sweep, again):
    before = _runs(again)
    parent_id = _sweep()
    after = _runs(again)
    assert set(after) - set(before) == {parent_id}  # a new parent, no training
    tags = after[parent_id].data.tags
    assert tags[names.SWEEP_RUNS_TAG] == first_sweep.runs[first_sweep.parent_id].data.tags[
        names.SWEEP_RUNS_TAG]
    assert tags[names.SWEEP_REUSED_TAG] == "3/3"
    assert all(tags[names.sweep_reused_tag(c)] == "true" for c in CELLS)
    assert after[parent_id].info.status == "FINISHED"
    assert names.SWEEP_FIGURE in {f.path for f in again.client.list_artifacts(parent_id, "sweep")}


def test_force_retrains_a_cell_that_could_be_reused(first_sweep, again):
    before = _runs(again)
    parent_id = _sweep(force=True, models="resnet18", skips="false")
    after = _runs(again)
    fresh = _training(after) - _training(before)
    tags = after[parent_id].data.tags
    assert fresh == {tags[names.SWEEP_RUNS_TAG]}
    assert tags[names.SWEEP_REUSED_TAG] == "0/1"
    assert after[parent_id].data.params["force"] == "true"
    assert after[tags[names.SWEEP_RUNS_TAG]].data.tags["mlflow.parentRunId"] == parent_id


# --- slow: real processes -------------------------------------------------------------------------
@pytest.mark.slow
def test_parallel_trains_cells_in_separate_processes_as_children_of_the_sweep(
        mlflow_store_for_slow):
    store = mlflow_store_for_slow
    args = ["sweep", "--parallel", "2", "--models", "resnet18", "--batch-norms", "false"]
    for name, value in Config(**TINY).to_params().items():
        if name not in config.SWEEP_GRID_FIELDS:
            args += [f"--{name.replace('_', '-')}", value]
    proc = run_in_store(store, *args, timeout=600)
    assert proc.returncode == 0, describe(proc)
    runs = _runs(store)
    (parent,) = [r for r in runs.values() if r.data.tags.get(names.STEP_TAG) == "sweep"]
    ids = parent.data.tags[names.SWEEP_RUNS_TAG].split(",")
    assert len(ids) == 2 and set(ids) == _training(runs)
    for cell, run_id in zip(["resnet18-noskip-nobn", "resnet18-skip-nobn"], ids):
        assert runs[run_id].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[run_id].data.tags[names.SWEEP_CELL_TAG] == cell
        assert runs[run_id].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_parallel_cells_that_fail_end_the_sweep_failed_with_one_line_naming_them(
        mlflow_store_for_slow):
    store = mlflow_store_for_slow
    missing = store.dir / "no-such-folder"
    proc = run_in_store(store, "sweep", "--parallel", "2", "--models", "resnet18",
                        "--batch-norms", "false", "--dataset", "imagefolder", "--data-dir",
                        str(missing), "--image-size", "32", timeout=300)
    assert proc.returncode == 2, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, describe(proc)  # one from each training process, then the sweep's
    assert errors[-1].startswith("error: sweep: 2 cell(s) failed: resnet18-noskip-nobn (exit "
                                 "code 2), resnet18-skip-nobn (exit code 2)"), errors[-1]
    (parent,) = _runs(store).values()  # the cells refused their input before starting a run
    assert parent.info.status == "FAILED" and "2 cell(s) failed" in parent.data.tags["error"]


@pytest.mark.slow
def test_the_done_when_command_runs_the_default_grid_under_mlflow_run(mlflow_store_for_slow):
    store = mlflow_store_for_slow
    # `mlflow run` starts the command in the project folder: the cells' checkpoints (each
    # deleted once its cell finishes) go to this test's folder instead.
    # The README's command has max_steps=50; 2 steps per cell, on 32 training and 16 test
    # images, make the same grid, runs and artifacts (how long 50 take is in the README's
    # table, measured, not asserted here).
    proc = run_mlflow(store, "sweep", {"dataset": "synthetic", "image_size": "32",
                                       "max_steps": "2", "synthetic_size": "32",
                                       "synthetic_test_size": "16",
                                       "checkpoint_dir": str(store.dir / "checkpoints")},
                      timeout=3600)
    assert proc.returncode == 0, describe(proc)
    runs = _runs(store)
    (parent,) = [r for r in runs.values() if r.data.tags.get(names.STEP_TAG) == "sweep"]
    assert parent.info.status == "FINISHED"
    ids = parent.data.tags[names.SWEEP_RUNS_TAG].split(",")
    assert len(ids) == 22 and set(ids) == _training(runs)
    assert all(runs[i].data.tags["mlflow.parentRunId"] == parent.info.run_id for i in ids)
    assert parent.data.tags[names.SWEEP_SKIPPED_TAG] == "vgg19-skip-nobn,vgg19-skip-bn"
    assert {f.path for f in store.client.list_artifacts(parent.info.run_id, "sweep")} >= {
        names.SWEEP_FIGURE, names.SWEEP_SUMMARY_CSV, names.SWEEP_SUMMARY_JSON}
    assert parent.data.params["epochs"] == "1"
    assert not list((store.dir / "checkpoints").glob("*/last.pt"))  # finished cells' are gone


@pytest.fixture
def mlflow_store_for_slow(tmp_path, monkeypatch, tmp_path_factory):
    """A fresh store for a subprocess; its training checkpoints (GBs for the default grid)
    are removed afterwards."""
    store = new_store(tmp_path, monkeypatch, tmp_path_factory)
    deactivate_store()
    yield store
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
