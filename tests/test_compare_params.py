"""The compare step on two runs that differ in more than ``skip``.

``runs=latest`` pairs the newest FINISHED run of each variant by model alone, so the two may
have been trained with BatchNorm in one and not the other, at other sizes, rates or seeds.
The compare names every training parameter that can move the numbers and differs: one line
on stderr, a line under the summary's title, and the ``compare.differing_params`` tag; it
still compares (a different setting can be deliberate).

Real sqlite stores throughout: runs shaped like training runs (``make_training_run``) logged
with the params a training run logs, and real tiny runs from ``pipeline.train.run``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import compare, names, param_diff, query
from pipeline.config import Config, fields
from runs_helpers import (TINY_TRAIN, Store, deactivate_store, describe, level,  # noqa: F401
                          make_training_run, mlflow_store, new_store, run_pipeline, trained_pair)

TAG = names.DIFFERING_PARAMS_TAG
WARNING = ("compare: warning: the runs differ in batch_norm (noskip true, skip false), "
           "image_size (64, 32); the comparison mixes these with the skip connections")


def logged_params(**typed: str | None) -> dict[str, str]:
    """Every param a training run logs (Config's defaults and world_size), with ``typed`` as
    a user typed them (None: not logged, as by an older version); less skip and layers,
    which make_training_run logs itself."""
    params = {**Config().to_params(), names.WORLD_SIZE_PARAM: "1", **typed}
    params.pop("skip")
    if "layers" not in typed:
        params.pop("layers")
    return {k: v for k, v in params.items() if v is not None}


def make_runs(store: Store, noskip: dict[str, str], skip: dict[str, str],
              tags: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """A noskip and a skip run (the newest of each), logged with ``logged_params``."""
    rng = np.random.default_rng(0)
    c, exp = store.client, store.project_experiment_id()
    ids = {}
    for variant, typed in (("noskip", noskip), ("skip", skip)):
        histories = {layer: level(rng, 0.1, 8) for layer in ("conv1", "layer1.0.conv1", "fc")}
        ids[variant] = make_training_run(c, exp, variant, histories, 4,
                                         params=logged_params(**typed)).run_id
        for key, value in (tags or {}).get(variant, {}).items():
            c.set_tag(ids[variant], key, value)
    return ids


def differing(store: Store, noskip: dict[str, str], skip: dict[str, str],
              tags: dict[str, dict[str, str]] | None = None) -> list[str]:
    ids = make_runs(store, noskip, skip, tags)
    return [name for name, _, _ in param_diff.differing_params(
        {v: query.get_run(run_id) for v, run_id in ids.items()})]


def summary_md(store: Store, run_id: str) -> str:
    root = Path(store.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    return (root / compare.SUMMARY_MD).read_text()


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line]


# --- the review's case: BatchNorm at 64 px against no BatchNorm at 32 px -----------------------
@pytest.fixture
def mismatched(mlflow_store, capsys):
    make_runs(mlflow_store, {"batch_norm": "true", "image_size": "64"},
              {"batch_norm": "false", "image_size": "32"})
    capsys.readouterr()
    compare_id = compare.compare()
    return mlflow_store, compare_id, capsys.readouterr().err


def test_runs_differing_in_more_than_skip_get_one_warning_line_naming_each_difference(mismatched):
    _, _, stderr = mismatched
    assert warnings_in(stderr) == [WARNING], stderr


def test_summary_states_the_differing_parameters_right_under_its_title(mismatched):
    store, compare_id, _ = mismatched
    md = summary_md(store, compare_id)
    lines = md.splitlines()
    assert lines[0] == "## Gradient norms: skip vs no skip"
    assert lines[2] == ("**Warning**: the runs differ in batch_norm (noskip true, skip false), "
                        "image_size (64, 32); the comparison mixes these with the skip "
                        "connections."), md[:600]
    assert store.client.get_run(compare_id).data.tags[names.NOTE_TAG] == md


def test_compare_run_of_differing_runs_finishes_tagged_with_the_differing_parameter_names(
        mismatched):
    store, compare_id, _ = mismatched
    run = store.client.get_run(compare_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG] == "batch_norm,image_size"
    summary = store.client.download_artifacts(compare_id, compare.SUMMARY_JSON,
                                              str(store.dir / "summary"))
    assert json.loads(Path(summary).read_text())["differing_params"] == [
        {"param": "batch_norm", "noskip": "true", "skip": "false"},
        {"param": "image_size", "noskip": "64", "skip": "32"}]


def test_the_command_line_compare_prints_the_warning_and_still_succeeds(mlflow_store):
    make_runs(mlflow_store, {"batch_norm": "true", "image_size": "64"},
              {"batch_norm": "false", "image_size": "32"})
    proc = run_pipeline(mlflow_store, "compare")
    assert proc.returncode == 0, describe(proc)
    assert warnings_in(proc.stderr) == [WARNING], describe(proc)


# --- runs that match -------------------------------------------------------------------------
def test_runs_differing_only_in_how_values_were_typed_compare_without_a_warning(
        mlflow_store, capsys):
    # `mlflow run -P lr=1e-3 -P batch_norm=yes` stores the values as typed.
    make_runs(mlflow_store, {"lr": "1e-3", "batch_norm": "yes", "model": "ResNet50"},
              {"lr": "0.001", "batch_norm": "true"})
    capsys.readouterr()
    compare_id = compare.compare()
    assert warnings_in(capsys.readouterr().err) == []
    assert mlflow_store.client.get_run(compare_id).data.tags[TAG] == "none"
    md = summary_md(mlflow_store, compare_id)
    assert md.splitlines()[2] == "Training parameters: the same apart from skip."
    assert "the runs differ" not in md


def test_parameters_that_choose_only_how_a_run_executes_or_is_logged_are_not_reported(
        mlflow_store):
    noskip = dict(num_workers="0", data_path="dataloader", graph="off", channels_last="false",
                  flush_every="4", experiment="mine", probe="both", log_model="false",
                  log_checkpoint="false", log_system_metrics="true", register_as="none",
                  checkpoint_every="10", checkpoint_dir="ckpt", on_nan="continue",
                  nproc_per_node="2", nnodes="1", rdzv_endpoint="none", device="auto")
    skip = dict(num_workers="auto", data_path="device", graph="auto", channels_last="auto",
                flush_every="100", experiment="auto", probe="output", log_model="auto",
                log_checkpoint="auto", log_system_metrics="auto", register_as="none",
                checkpoint_every="0", checkpoint_dir="checkpoints", on_nan="stop",
                nproc_per_node="1", nnodes="2", rdzv_endpoint="host:29500", device="cpu")
    cpu = {names.DEVICE_TAG: "cpu"}
    assert differing(mlflow_store, noskip, skip, {"noskip": cpu, "skip": cpu}) == []


# Each case: the two runs' typed params (and tags), and the parameters reported.
CASES = {
    "data_dir of CIFAR-10 (the same MD5-checked files)":
        ({"dataset": "cifar10", "data_dir": "a"}, {"dataset": "cifar10", "data_dir": "b"}, None,
         []),
    "data_dir of an image folder":
        ({"dataset": "imagefolder", "data_dir": "a"}, {"dataset": "imagefolder", "data_dir": "b"},
         None, ["data_dir"]),
    "synthetic set sizes, with CIFAR-10":
        ({"synthetic_size": "10"}, {"synthetic_size": "20"}, None, []),
    "synthetic set sizes, with synthetic data":
        ({"dataset": "synthetic", "synthetic_size": "10", "synthetic_test_size": "5"},
         {"dataset": "synthetic", "synthetic_size": "20", "synthetic_test_size": "5"}, None,
         ["synthetic_size"]),
    "metric_every, with the five default layers":
        ({"metric_every": "1"}, {"metric_every": "100"}, None, []),
    "metric_every, with layers=all":
        ({"layers": "all", "metric_every": "1"}, {"layers": "all", "metric_every": "100"}, None,
         ["metric_every"]),
    "device auto, resolved to the same device type":
        ({"device": "auto"}, {"device": "cuda"},
         {"noskip": {names.DEVICE_TAG: "cuda:0"}, "skip": {names.DEVICE_TAG: "cuda"}}, []),
    "device auto, resolved to different devices":
        ({"device": "auto"}, {"device": "auto"},
         {"noskip": {names.DEVICE_TAG: "cuda:0"}, "skip": {names.DEVICE_TAG: "cpu"}}, ["device"]),
    "processes in DDP":
        ({names.WORLD_SIZE_PARAM: "2"}, {names.WORLD_SIZE_PARAM: "1"}, None, ["world_size"]),
    "a param only one run logged (an older version's run)":
        ({"precision": "bf16"}, {"precision": None}, None, ["precision"]),
    "the recipe, in Config's order":
        ({"seed": "1", "lr": "0.01", "init": "kaiming", "epochs": "2", "precision": "fp32"},
         {"seed": "0", "lr": "0.001", "init": "pytorch", "epochs": "1", "precision": "default"},
         None, ["init", "epochs", "lr", "seed", "precision"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_parameter_is_reported_only_where_it_can_change_the_numbers(mlflow_store, case):
    noskip, skip, tags, expected = CASES[case]
    assert differing(mlflow_store, noskip, skip, tags) == expected


def test_a_param_one_run_did_not_log_is_shown_as_not_logged(mlflow_store):
    ids = make_runs(mlflow_store, {"precision": "bf16", "lr": "1e-2"}, {"precision": None})
    found = param_diff.differing_params({v: query.get_run(i) for v, i in ids.items()})
    assert found == [("lr", "0.01", "0.001"), ("precision", "bf16", "not logged")]


def test_every_parameter_the_compare_treats_apart_is_a_training_parameter():
    # A renamed Config field would otherwise be reported again, or silently not compared.
    known = {f.name for f in fields(Config)}
    assert param_diff.INERT_PARAMS <= known
    assert set(param_diff.ONLY_WITH) <= known
    assert {other for other, _ in param_diff.ONLY_WITH.values()} <= known
    assert set(param_diff.RESOLVED_BY_TAG) <= known


# --- real training runs --------------------------------------------------------------------------
def test_compare_of_real_runs_trained_alike_reports_no_differing_parameter(
        trained_pair, tmp_path, monkeypatch, tmp_path_factory, capsys):
    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=trained_pair.dir)
    try:
        capsys.readouterr()
        compare_id = compare.compare()
        assert warnings_in(capsys.readouterr().err) == []
        assert store.client.get_run(compare_id).data.tags[TAG] == "none"
    finally:
        deactivate_store()


def test_compare_of_a_real_run_trained_with_batch_norm_at_another_size_names_exactly_those(
        trained_pair, tmp_path, monkeypatch, tmp_path_factory, capsys):
    from pipeline import train

    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=trained_pair.dir)
    try:
        # The newest noskip run, which runs=latest pairs with the pair's skip run (32 px);
        # 40 px differs as 64 px would, at 40% of the pixels.
        newer = train.run(Config(**{**TINY_TRAIN, "skip": False, "batch_norm": True,
                                    "image_size": 40}))
        capsys.readouterr()
        compare_id = compare.compare()
        tags = store.client.get_run(compare_id).data.tags
        assert (tags["compare.noskip_run"], tags["compare.skip_run"]) == (newer, trained_pair.skip)
        assert warnings_in(capsys.readouterr().err) == [WARNING.replace("(64, 32)", "(40, 32)")]
        assert tags[TAG] == "batch_norm,image_size"
    finally:
        deactivate_store()


def test_runs_labelled_by_a_param_are_not_warned_of_that_param_but_of_any_other(mlflow_store, capfd):
    rng = np.random.default_rng(3)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    ids = [make_training_run(c, exp, "noskip",
                             {layer: level(rng, 0.1, 8) for layer in ("conv1", "fc")}, 4,
                             params=logged_params(lr=lr, seed=seed)).run_id
           for lr, seed in (("0.001", "0"), ("0.01", "1"))]
    capfd.readouterr()
    run = c.get_run(compare.compare(run_ids=ids, label="lr"))
    assert run.data.tags[names.COMPARE_LABELS_TAG] == "lr_0.001,lr_0.01"
    assert run.data.tags[TAG] == "seed"  # lr is what the runs are compared by
    assert [w for w in warnings_in(capfd.readouterr().err)] == [
        "compare: warning: the runs differ in seed (lr_0.001 0, lr_0.01 1); the comparison "
        "mixes these in any difference between them"]
