"""The query API (pipeline.query): the project's only reader of MLflow.

Every test builds its own sqlite store with runs whose histories the test chose, and checks
what ``find_runs`` and ``gradient_history`` return against those histories and against
``MlflowClient.get_metric_history``.
"""
from __future__ import annotations

import re
import textwrap

import numpy as np
import pandas as pd
import pytest

from mlflow.entities import Metric, Param

from pipeline import query
from pipeline.config import ConfigError
from pipeline.query import QueryError
from runs_helpers import (REPO_ROOT, make_pair, make_plain_run, make_training_run,
                          mlflow_store, next_time)  # noqa: F401 - mlflow_store is a fixture

# The tracking API page of the docs, whose first snippet must run as written.
API_PAGE = REPO_ROOT / "docs" / "guide" / "python-api.md"


def _histories(rng, n, layers=("conv1", "layer1.0.conv1", "fc")):
    return {layer: rng.uniform(0.1, 1.0, n) for layer in layers}


@pytest.fixture
def mixed_experiment(mlflow_store):
    """Default experiment: four training runs (two per variant, one RUNNING, one with another
    model and seed) and two runs that are not training runs (a compare and an `all` run)."""
    rng = np.random.default_rng(1)
    exp = mlflow_store.project_experiment_id()
    c = mlflow_store.client
    runs = {
        "noskip_old": make_training_run(c, exp, "noskip", _histories(rng, 6), 3, seed=1),
        "skip_old": make_training_run(c, exp, "skip", _histories(rng, 6), 3, seed=2,
                                      params={"skip": "yes", "seed": "1", "lr": "0.01"}),
        "compare": make_plain_run(c, exp, "compare-resnet50", {"compare.runs": "x,y"}),
        "noskip_new": make_training_run(c, exp, "noskip", _histories(rng, 6), 3, seed=3,
                                        model="resnet18"),
        "skip_running": make_training_run(c, exp, "skip", _histories(rng, 6), 3, seed=4,
                                          status="RUNNING"),
        "all": make_plain_run(c, exp, "all-resnet50", {"pipeline.step": "all"}),
    }
    return mlflow_store, exp, runs


def _ids(frame: pd.DataFrame) -> list[str]:
    return frame["run_id"].tolist()


# --- find_runs ------------------------------------------------------------------------------
def test_find_runs_returns_only_training_runs_newest_first(mixed_experiment):
    _, _, runs = mixed_experiment
    found = query.find_runs()
    expected = [runs[k].run_id for k in ("skip_running", "noskip_new", "skip_old", "noskip_old")]
    assert _ids(found) == expected


def test_find_runs_includes_params_tags_and_final_metrics(mixed_experiment):
    _, _, runs = mixed_experiment
    found = query.find_runs().set_index("run_id")
    run = runs["skip_old"]
    row = found.loc[run.run_id]
    assert row["params.model"] == "resnet50"
    assert row["params.lr"] == "0.01"
    assert row["tags.variant"] == "skip"
    for key, value in run.finals.items():
        assert row[f"metrics.{key}"] == pytest.approx(value, rel=1e-12), key
    assert row["metrics.grad_norm/fc"] == pytest.approx(run.histories["fc"][-1], rel=1e-12)


@pytest.mark.parametrize("value", [True, "true", "yes", "1", "TRUE"])
def test_find_runs_skip_filter_accepts_any_true_spelling_and_uses_the_variant_tag(
        mixed_experiment, value):
    _, _, runs = mixed_experiment
    # skip_old was logged with params.skip = "yes": only its variant tag says "skip".
    assert _ids(query.find_runs(skip=value)) == [runs["skip_running"].run_id,
                                                 runs["skip_old"].run_id]


@pytest.mark.parametrize("value", [False, "false", "no", "0"])
def test_find_runs_skip_false_returns_only_noskip_runs(mixed_experiment, value):
    _, _, runs = mixed_experiment
    assert _ids(query.find_runs(skip=value)) == [runs["noskip_new"].run_id,
                                                 runs["noskip_old"].run_id]


def test_find_runs_filters_by_model_and_other_params_by_their_parsed_value(mixed_experiment):
    _, _, runs = mixed_experiment
    assert _ids(query.find_runs(model="resnet18")) == [runs["noskip_new"].run_id]
    assert _ids(query.find_runs(seed=1)) == [runs["skip_old"].run_id]
    assert _ids(query.find_runs(lr=0.01, skip=True)) == [runs["skip_old"].run_id]
    assert _ids(query.find_runs(model="resnet50", skip=False)) == [runs["noskip_old"].run_id]
    assert len(query.find_runs(model="vgg16")) == 0


def test_find_runs_matches_a_param_by_its_parsed_value_however_the_run_stored_it(mlflow_store):
    # `mlflow run -P lr=1e-3` stores "1e-3" as typed; the CLI and train.run store "0.001".
    rng = np.random.default_rng(3)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    typed = make_training_run(c, exp, "skip", _histories(rng, 4), 2,
                              params={"lr": "1e-3", "batch_norm": "yes"}).run_id
    canonical = make_training_run(c, exp, "skip", _histories(rng, 4), 2,
                                  params={"lr": "0.001", "batch_norm": "true"}).run_id
    make_training_run(c, exp, "skip", _histories(rng, 4), 2,
                      params={"lr": "0.01", "batch_norm": "false"})
    for lr in (0.001, 1e-3, "1e-3", "0.0010", " 0.001"):
        assert _ids(query.find_runs(lr=lr)) == [canonical, typed], lr
    for batch_norm in (True, "yes", "TRUE", "1"):
        assert _ids(query.find_runs(batch_norm=batch_norm, lr=0.001)) == [canonical, typed]


def test_find_runs_matches_values_this_version_cannot_parse_by_their_exact_string(
        mixed_experiment):
    # An unknown model is no error: runs logged by an older version may still carry it.
    store, exp, _ = mixed_experiment
    old = make_training_run(store.client, exp, "noskip", {"fc": [1.0, 2.0]}, 2,
                            model="vgg16").run_id
    assert _ids(query.find_runs(model="vgg16")) == [old]
    assert len(query.find_runs(model="alexnet")) == 0
    store.client.log_param(old, "removed_param", "x")  # a param this version no longer has
    assert _ids(query.find_runs(removed_param="x")) == [old]


def test_find_runs_filters_by_status(mixed_experiment):
    _, _, runs = mixed_experiment
    assert _ids(query.find_runs(status="RUNNING")) == [runs["skip_running"].run_id]
    assert _ids(query.find_runs(status="FINISHED", skip=True)) == [runs["skip_old"].run_id]


def test_find_runs_takes_an_experiment_by_name_or_id_and_defaults_to_the_current_one(mlflow_store):
    rng = np.random.default_rng(2)
    c = mlflow_store.client
    other = c.create_experiment("other-experiment")
    in_default = make_training_run(c, mlflow_store.project_experiment_id(), "skip",
                                   _histories(rng, 4), 2)
    in_other = make_training_run(c, other, "noskip", _histories(rng, 4), 2)
    assert _ids(query.find_runs()) == [in_default.run_id]
    assert _ids(query.find_runs("other-experiment")) == [in_other.run_id]
    assert _ids(query.find_runs(other)) == [in_other.run_id]


def test_find_runs_on_an_experiment_without_training_runs_is_empty(mlflow_store):
    c = mlflow_store.client
    make_plain_run(c, mlflow_store.project_experiment_id(), "compare-resnet50")
    assert len(query.find_runs()) == 0
    c.create_experiment("empty")
    assert len(query.find_runs("empty")) == 0


def test_find_runs_on_an_unknown_experiment_raises_query_error(mlflow_store):
    with pytest.raises(QueryError, match="no-such-experiment"):
        query.find_runs("no-such-experiment")


# --- gradient_history -----------------------------------------------------------------------
@pytest.fixture
def pair(mlflow_store):
    return mlflow_store, make_pair(mlflow_store, steps_per_epoch=7)


def test_gradient_history_is_a_tidy_frame_with_every_point_in_step_order(pair):
    store, runs = pair
    run = runs["skip"]
    hist = query.gradient_history(run.run_id)
    assert list(hist.columns) == ["step", "layer", "norm", "epoch"]
    layers = list(run.histories)
    n = len(run.histories["fc"])
    assert len(hist) == n * len(layers)
    # step order, each step listing the layers input side first (the run's layers param)
    assert hist["step"].tolist() == [s for s in range(n) for _ in layers]
    assert [str(x) for x in hist["layer"]] == layers * n
    for layer, values in run.histories.items():
        got = hist[hist["layer"] == layer]
        np.testing.assert_array_equal(got["step"].to_numpy(), np.arange(n))
        np.testing.assert_array_equal(got["norm"].to_numpy(), values)


def test_gradient_history_epoch_is_step_floor_divided_by_steps_per_epoch(pair):
    _, runs = pair
    run = runs["noskip"]
    hist = query.gradient_history(run.run_id)
    np.testing.assert_array_equal(hist["epoch"].to_numpy(),
                                  hist["step"].to_numpy() // run.steps_per_epoch)
    assert sorted(hist["epoch"].unique().tolist()) == list(
        range(-(-len(run.histories["fc"]) // run.steps_per_epoch)))


def test_gradient_history_matches_get_metric_history(pair):
    store, runs = pair
    run = runs["noskip"]
    hist = query.gradient_history(run.run_id)
    for layer in run.histories:
        points = sorted(store.client.get_metric_history(run.run_id, f"grad_norm/{layer}"),
                        key=lambda p: p.step)
        got = hist[hist["layer"] == layer]
        assert got["step"].tolist() == [p.step for p in points]
        assert got["norm"].tolist() == [p.value for p in points]


def test_gradient_history_reads_only_the_requested_layers_in_the_requested_order(pair):
    _, runs = pair
    run = runs["skip"]
    hist = query.gradient_history(run.run_id, ["fc", "conv1"])
    n = len(run.histories["fc"])
    assert [str(x) for x in hist["layer"]] == ["fc", "conv1"] * n
    np.testing.assert_array_equal(hist.loc[hist["layer"] == "conv1", "norm"].to_numpy(),
                                  run.histories["conv1"])


def test_gradient_history_keeps_exact_zeros_and_tiny_values(pair):
    _, runs = pair
    hist = query.gradient_history(runs["skip"].run_id, ["conv1"])
    expected = runs["skip"].histories["conv1"]
    assert (hist["norm"] == 0).sum() == (expected == 0).sum() > 0
    tiny = query.gradient_history(runs["noskip"].run_id, ["conv1"])["norm"].to_numpy()
    np.testing.assert_array_equal(tiny, runs["noskip"].histories["conv1"])  # ~1e-21, exactly


def test_gradient_history_of_an_unknown_run_raises_a_one_line_error_naming_it(mlflow_store):
    bad = "0123456789abcdef0123456789abcdef"
    with pytest.raises(QueryError) as err:
        query.gradient_history(bad)
    assert bad in str(err.value)
    assert "\n" not in str(err.value)


def test_gradient_history_of_a_run_without_grad_norm_metrics_raises_query_error(mlflow_store):
    run_id = make_plain_run(mlflow_store.client, mlflow_store.project_experiment_id(), "other")
    with pytest.raises(QueryError) as err:
        query.gradient_history(run_id)
    assert run_id in str(err.value) and "grad_norm" in str(err.value)
    assert "\n" not in str(err.value)


def _weight_probed_run(store) -> str:
    """A run shaped like one trained with probe=weight: weight_grad_norm/* metrics only."""
    c = store.client
    run_id = c.create_run(store.project_experiment_id(), start_time=next_time(),
                          tags={"variant": "noskip", "steps_per_epoch": "2"},
                          run_name="resnet50-noskip").info.run_id
    c.log_batch(run_id, metrics=[Metric(f"weight_grad_norm/{layer}", 0.5 + s, next_time(), s)
                                 for layer in ("conv1", "fc") for s in range(4)],
                params=[Param("probe", "weight"), Param("layers", "conv1,fc")])
    c.set_terminated(run_id, "FINISHED")
    return run_id


def test_gradient_history_of_a_weight_probed_run_says_to_ask_for_quantity_weight(mlflow_store):
    run_id = _weight_probed_run(mlflow_store)
    with pytest.raises(QueryError) as err:
        query.gradient_history(run_id)
    message = str(err.value)
    assert run_id in message and "\n" not in message
    assert "probe=weight" in message and "quantity='weight'" in message, message
    assert "is it a training run" not in message
    # the advice works as given
    hist = query.gradient_history(run_id, quantity="weight")
    assert hist["norm"].tolist() == [0.5 + s for s in range(4) for _ in ("conv1", "fc")]


def test_gradient_history_refuses_an_unknown_quantity_naming_the_allowed_ones(pair):
    _, runs = pair
    with pytest.raises(ConfigError) as err:
        query.gradient_history(runs["skip"].run_id, quantity="weights")
    assert str(err.value) == "quantity: 'weights' is not allowed; allowed: output, weight"


def test_gradient_history_of_an_unprobed_layer_raises_query_error_naming_it(pair):
    _, runs = pair
    with pytest.raises(QueryError) as err:
        query.gradient_history(runs["skip"].run_id, ["conv1", "layer4.2.conv3"])
    assert "layer4.2.conv3" in str(err.value)
    assert "\n" not in str(err.value)


# --- the docs' snippet -------------------------------------------------------------------------
def _docs_snippet() -> str:
    text = API_PAGE.read_text()
    heading = re.search(r"^#+ .*tracking API.*$", text, flags=re.M | re.I)
    assert heading, f"{API_PAGE} has no heading mentioning the tracking API"
    rest = text[heading.end():]
    block = re.search(r"```python\n(.*?)```", rest, flags=re.S)
    assert block, "no ```python block under the tracking API heading"
    return textwrap.dedent(block.group(1))


def test_the_docs_tracking_api_snippet_runs_as_written(pair, capsys):
    code = _docs_snippet()
    exec(compile(code, str(API_PAGE) + " (tracking API snippet)", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip(), "the snippet ran but showed nothing"


def test_find_runs_refuses_a_misspelt_parameter_instead_of_matching_nothing(mixed_experiment):
    with pytest.raises(QueryError) as excinfo:
        query.find_runs(lrr=0.001)
    message = str(excinfo.value)
    assert message.startswith("lrr:") and "did you mean lr?" in message
