"""Tracking against a real sqlite MLflow store: batched metric writes and attaching to the
run that `mlflow run` created."""
from __future__ import annotations

import math

import mlflow
import pytest
import torch
import torch.nn as nn
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.config import Config
from pipeline.probes import GradientProbes
from pipeline.tracking import MAX_METRICS_PER_CALL, Tracker

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_active_run_left_behind():
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


def test_chunks_larger_than_one_log_batch_land_in_the_store_exactly_once(tracking_store):
    # 4 layers + loss over 260 steps in chunks of 250: 1,250 points in one chunk, more than
    # one log_batch call may carry, then a partial chunk.
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    layers = ("0", "1", "2", "3")
    steps, flush_every = 260, 250
    assert flush_every * (len(layers) + 1) > MAX_METRICS_PER_CALL
    keys = [names.grad_norm(layer) for layer in layers] + [names.TRAIN_LOSS]

    tracker = Tracker.start("tracking-test", {"a": "1"}, {"t": "x"})
    tracker.stream(keys)
    probes = GradientProbes(model, layers, flush_every, CPU)
    losses = []
    for step in range(steps):
        loss = model(torch.full((1, 3), float(step + 1))).square().sum()
        loss.backward()
        losses.append(float(loss.detach()))
        tracker.submit(probes.commit(loss))
    tracker.submit(probes.drain())
    tracker.log_epoch(0, {names.TEST_ACCURACY: 0.5}, 0)
    series = tracker.flush()
    tracker.end("FINISHED")

    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1"} and run.data.tags["t"] == "x"
    for key in keys:
        points = sorted(client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(steps)), key
        assert all(math.isfinite(m.value) and m.value > 0 for m in points), key
        # what flush() hands back (the JSON and plot are made from it) is what the store holds
        assert sorted(series[key]) == [(m.step, m.value) for m in points], key
    logged_loss = [m.value for m in sorted(client.get_metric_history(tracker.run_id, names.TRAIN_LOSS),
                                           key=lambda m: m.step)]
    assert logged_loss == losses
    assert [m.value for m in client.get_metric_history(tracker.run_id, names.TEST_ACCURACY)] == [0.5]


def test_attaching_to_a_run_from_mlflow_run_keeps_its_param_strings_and_adds_the_rest(
        tracking_store, monkeypatch):
    # `mlflow run -P skip=False -P lr=1e-3` logs the strings as typed; ours are "false"
    # and "0.001". Logging a key again with another value raises in MLflow.
    client = MlflowClient()
    pending = client.create_run(experiment_id="0")
    run_id = pending.info.run_id
    client.log_param(run_id, "skip", "False")
    client.log_param(run_id, "lr", "1e-3")
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)

    cfg = Config.from_strings({"skip": "False", "lr": "1e-3"})
    tracker = Tracker.start(cfg.run_name, cfg.to_params(), {names.VARIANT_TAG: cfg.variant})
    assert tracker.run_id == run_id
    tracker.end("FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resnet50-noskip"
    assert run.data.params["skip"] == "False" and run.data.params["lr"] == "1e-3"
    expected = dict(cfg.to_params(), skip="False", lr="1e-3")
    assert run.data.params == expected
    assert run.data.tags[names.VARIANT_TAG] == "noskip"
    assert len(client.search_runs(["0"])) == 1


def test_ending_a_run_as_failed_records_the_error_tag(tracking_store):
    tracker = Tracker.start("failing", {}, {})
    tracker.stream([names.TRAIN_LOSS])
    tracker.end("FAILED", "RuntimeError: boom")
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[names.ERROR_TAG] == "RuntimeError: boom"


def test_a_description_over_mlflows_tag_limit_is_cut_at_a_line_end_and_says_where_the_rest_is(
        tracking_store, capfd):
    lines = [f"| layer{i} | {'x' * 60} |" for i in range(300)]  # ~20,000 characters
    tracker = Tracker.start("long-note", {}, {})
    capfd.readouterr()
    tracker.set_note("\n".join(lines), ("comparison/summary.md",))
    # MLflow's own logger (which does not propagate to the root) warns on stderr when it
    # cuts a tag itself.
    warned = capfd.readouterr().err
    tracker.end("FINISHED")
    note = MlflowClient().get_run(tracker.run_id).data.tags[names.NOTE_TAG]
    assert 7000 < len(note) <= 8000
    body, tail = note.rsplit("\n\n", 1)
    assert body.split("\n") == lines[:len(body.split("\n"))]  # whole lines, none cut mid-way
    assert "`comparison/summary.md`" in tail and "8,000" in tail
    assert "truncated" not in warned, warned  # MLflow had nothing to cut


def test_a_description_within_the_limit_is_kept_as_it_is(tracking_store):
    tracker = Tracker.start("short-note", {}, {})
    tracker.set_note("## a summary\n\n| a | b |\n", ("comparison/summary.md",))
    tracker.end("FINISHED")
    assert MlflowClient().get_run(tracker.run_id).data.tags[names.NOTE_TAG] == "## a summary\n\n| a | b |\n"
