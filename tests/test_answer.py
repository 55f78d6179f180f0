"""The answer where users look: log10 twins of the norm metrics (MLflow's charts are linear),
summaries as metrics, report.html on every run, and what the terminal prints.

Real runs (the shared tiny skip/noskip pair of ResNet-50s), a real compare run, and real
`python -m pipeline` processes, one of them on a pseudo-terminal.
"""
from __future__ import annotations

import math
import os
import pty
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline import compare, names, query
from pipeline.gradient_flow import Collector
from runs_helpers import (deactivate_store, describe, new_store, run_pipeline,
                          subprocess_env, trained_pair)  # noqa: F401 - trained_pair: a fixture

ANSI = "\x1b["


@pytest.fixture(scope="module")
def pair_and_compare(trained_pair, tmp_path_factory):
    """The trained pair, and the compare run made from it, in a store of this module's own."""
    directory = tmp_path_factory.mktemp("answer_store")
    with pytest.MonkeyPatch.context() as mp:
        store = new_store(directory, mp, tmp_path_factory, source=trained_pair.dir)
        try:
            compare_id = compare.compare(run_ids=[trained_pair.noskip, trained_pair.skip])
        finally:
            deactivate_store()
    return store, {"noskip": trained_pair.noskip, "skip": trained_pair.skip, "compare": compare_id}


# --- the log10 twins ---------------------------------------------------------------------------
def test_the_writer_gets_a_log10_twin_of_every_norm_with_zeros_at_the_documented_floor():
    layers = ("conv1", "mid", "fc")
    collector = Collector(layers, layers, metric_every=1)
    row = np.array([[0.0, 1e-21, 0.25, 2.302585]])  # three norms, then the loss
    values = dict(zip(collector.keys, collector.metric_values(row)[0]))
    assert values["grad_norm_log10/conv1"] == names.LOG10_FLOOR == -40.0
    assert values["grad_norm_log10/mid"] == pytest.approx(-21.0, abs=1e-12)
    assert values["grad_norm_log10/fc"] == pytest.approx(math.log10(0.25), abs=1e-15)
    assert values["grad_norm/conv1"] == 0.0 and values["train/loss"] == 2.302585
    assert collector.keys[-1] == names.TRAIN_LOSS  # the console reads the loss last


def test_a_nan_norm_has_a_nan_twin_not_the_floor():
    collector = Collector(("a", "fc"), ("a", "fc"), metric_every=1)
    values = dict(zip(collector.keys, collector.metric_values(np.array([[np.nan, 1.0, 2.0]]))[0]))
    assert math.isnan(values["grad_norm_log10/a"])


def test_a_training_run_logs_each_norms_log10_at_the_same_steps(pair_and_compare):
    store, ids = pair_and_compare
    client = store.client
    for variant in ("noskip", "skip"):
        run = client.get_run(ids[variant])
        layers = run.data.tags[names.METRIC_LAYERS_TAG].split(",")
        for layer in layers:
            norms = {m.step: m.value for m in client.get_metric_history(ids[variant],
                                                                         names.grad_norm(layer))}
            twins = {m.step: m.value for m in client.get_metric_history(
                ids[variant], names.grad_norm_log10(layer))}
            assert set(twins) == set(norms) and len(norms) > 0, layer
            for step, value in norms.items():
                expected = names.LOG10_FLOOR if value < 1e-40 else math.log10(value)
                assert twins[step] == pytest.approx(expected, abs=1e-9), (layer, step)


def test_the_no_skip_stems_log10_chart_sits_about_twenty_decades_below_the_skip_one(
        pair_and_compare):
    store, ids = pair_and_compare
    medians = {v: np.median([m.value for m in store.client.get_metric_history(
        ids[v], names.grad_norm_log10("conv1"))]) for v in ("noskip", "skip")}
    assert medians["skip"] - medians["noskip"] > 15  # decades, on the chart's own axis


# --- summaries as metrics ------------------------------------------------------------------------
def test_a_training_run_logs_its_first_layer_median_and_first_to_last_decades(
        pair_and_compare, monkeypatch):
    store, ids = pair_and_compare
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    for variant in ("noskip", "skip"):
        run = store.client.get_run(ids[variant])
        dense = query.dense_norms(ids[variant])
        first, head = np.median(dense["norms"][:, 0]), np.median(dense["norms"][:, -1])
        assert run.data.metrics[names.FIRST_LAYER_MEDIAN] == pytest.approx(first, rel=1e-12)
        assert run.data.metrics[names.FIRST_TO_LAST_DECADES] == pytest.approx(
            math.log10(first / head), abs=1e-9)
        # ... beside the tag it restates, rounded to 3 digits there
        ratio = float(run.data.tags[names.FIRST_TO_LAST_TAG])
        assert run.data.metrics[names.FIRST_TO_LAST_DECADES] == pytest.approx(
            math.log10(ratio), abs=0.01)


def test_a_compare_run_logs_the_decades_between_the_runs_and_each_test_accuracy(
        pair_and_compare):
    store, ids = pair_and_compare
    client = store.client
    metrics = client.get_run(ids["compare"]).data.metrics
    table = pd.read_csv(client.download_artifacts(ids["compare"], compare.SUMMARY_CSV))
    for layer, rows in table.groupby("layer"):
        medians = rows.set_index("variant")["median"]
        assert metrics[names.compare_decades(layer)] == pytest.approx(
            math.log10(medians["skip"] / medians["noskip"]), abs=1e-9), layer
    for variant in ("noskip", "skip"):
        assert metrics[names.compare_test_accuracy(variant)] == client.get_run(
            ids[variant]).data.metrics[names.TEST_ACCURACY]
    assert metrics[names.compare_decades("conv1")] > 15


# --- report.html ----------------------------------------------------------------------------------
def test_training_and_compare_runs_carry_a_self_contained_report(pair_and_compare):
    store, ids = pair_and_compare
    for key, words in (("noskip", "resnet50-noskip"), ("skip", "resnet50-skip"),
                       ("compare", "without skips")):
        listed = [f.path for f in store.client.list_artifacts(ids[key])]
        assert names.REPORT_HTML in listed, key
        page = open(store.client.download_artifacts(ids[key], names.REPORT_HTML)).read()
        assert words in page and "<script src=" not in page, key


# --- the terminal ---------------------------------------------------------------------------------
def test_compare_says_which_run_is_which_then_the_diagnosis_and_how_to_open_it(
        pair_and_compare):
    store, ids = pair_and_compare
    proc = run_pipeline(store, "compare", "--runs", f"{ids['skip']},{ids['noskip']}")
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"compare: noskip = resnet50-noskip ({ids['noskip']}), "
                        f"skip = resnet50-skip ({ids['skip']})"), describe(proc)
    conv1 = next(line.split() for line in lines if line.split()[:1] == ["conv1"])
    assert conv1[2] == "Vanishing" and conv1[4] == "Healthy", describe(proc)
    assert any(line.startswith("- Input-side layer conv1:") for line in lines), describe(proc)
    new_id = proc.stdout.split("MLflow compare run ")[1].split()[0]
    assert f"mlflow ui --backend-store-uri {store.uri}" in proc.stdout
    assert f"/runs/{new_id}?workflowType=machine_learning" in proc.stdout
    assert ANSI not in proc.stdout + proc.stderr  # a pipe: plain text


def test_on_a_terminal_the_statuses_are_coloured_unless_no_color_is_set(pair_and_compare):
    store, ids = pair_and_compare
    outputs = {}
    for no_color in ("", "1"):
        leader, follower = pty.openpty()
        env = subprocess_env(store)
        env.pop("NO_COLOR", None)
        if no_color:
            env["NO_COLOR"] = no_color
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compare", "--runs",
                                 f"{ids['noskip']},{ids['skip']}"], cwd=store.dir, env=env,
                                stdout=follower, stderr=subprocess.DEVNULL)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower closed: the process is done writing
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0
        os.close(leader)
        outputs[no_color] = b"".join(chunks).decode()
    assert "\x1b[31mVanishing" in outputs[""] and "\x1b[32mHealthy" in outputs[""]
    assert ANSI not in outputs["1"] and "Vanishing" in outputs["1"]


def test_against_a_tracking_server_the_answer_ends_with_the_runs_url_in_the_ml_view():
    from pipeline import console

    assert console.how_to_open("https://mlflow.lab:5000/", "3", "abc") == [
        "  open: https://mlflow.lab:5000/#/experiments/3/runs/abc?workflowType=machine_learning",
        "  report: report.html in the run's Artifacts tab (the answer on one page)"]
    local = console.how_to_open("sqlite:///mlflow.db", "3", "abc")
    assert local[0] == "  open: mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert local[1].endswith("http://127.0.0.1:5000/#/experiments/3/runs/abc"
                             "?workflowType=machine_learning")
