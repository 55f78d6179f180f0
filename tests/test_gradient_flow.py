"""layers=all, the dense gradients/norms.npz, thinned metrics, the gradient-flow plots, and
the diagnosis tags (pipeline/gradient_flow.py)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from pipeline import checkpoint, names
from pipeline.config import ALL_LAYERS, Config, ConfigError
from pipeline.gradient_flow import Collector
from pipeline.health import diagnose

TINY = dict(dataset="synthetic", image_size=32, batch_size=4, synthetic_size=16, max_steps=3,
            num_workers="0", device="cpu", log_model="false")


def _load_npz(client, run_id, tmp_path):
    path = client.download_artifacts(run_id, names.NORMS_NPZ, str(tmp_path))
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def all_run(module_tracking_store):
    """One tiny resnet50 (no skip) run with layers=all, metric_every=2, chunks of 2 rows."""
    from mlflow import MlflowClient

    from pipeline import train

    run_id = train.run(Config(layers=ALL_LAYERS, metric_every=2, flush_every=2, **TINY))
    return MlflowClient(), run_id


# --- config ------------------------------------------------------------------------------
def test_layers_all_parses_like_auto_and_stands_alone():
    assert Config.from_strings({"layers": "ALL"}).layers == ALL_LAYERS
    with pytest.raises(ConfigError, match="stands alone"):
        Config.from_strings({"layers": "all,fc"})


def test_metric_every_must_be_a_positive_integer():
    assert Config().metric_every == 100
    with pytest.raises(ConfigError, match="metric_every"):
        Config.from_strings({"metric_every": "0"})


# --- a real run with layers=all ---------------------------------------------------------------
def test_layers_all_probes_every_conv_and_linear_that_runs_in_forward(all_run):
    from pipeline.models import all_layers, build_model

    client, run_id = all_run
    resolved = client.get_run(run_id).data.tags[names.LAYERS_RESOLVED_TAG].split(",")
    expected = all_layers(build_model("resnet50", skip=False), 32)
    assert resolved == expected
    # resnet50 without skip: 1 stem conv + 16 blocks x 3 convs (the 4 downsample convs never
    # run) + fc
    assert len(resolved) == 1 + 16 * 3 + 1 and resolved[0] == "conv1" and resolved[-1] == "fc"
    assert not any("downsample" in layer for layer in resolved)


def test_the_dense_artifact_has_every_layer_at_every_step_in_the_documented_schema(all_run, tmp_path):
    client, run_id = all_run
    dense = _load_npz(client, run_id, tmp_path)
    assert set(dense) == {"steps", "layers", "norms", "loss"}
    assert dense["steps"].dtype == np.int64 and dense["steps"].tolist() == [0, 1, 2]
    assert dense["layers"].tolist() == client.get_run(run_id).data.tags[
        names.LAYERS_RESOLVED_TAG].split(",")
    assert dense["norms"].dtype == np.float64 and dense["norms"].shape == (3, 50)
    assert dense["loss"].dtype == np.float64 and dense["loss"].shape == (3,)
    assert np.isfinite(dense["norms"]).all() and (dense["norms"][:, -1] > 0).all()


def test_the_dense_artifact_agrees_bitwise_with_every_logged_metric(all_run, tmp_path):
    client, run_id = all_run
    dense = _load_npz(client, run_id, tmp_path)
    row = {int(s): i for i, s in enumerate(dense["steps"])}
    compared = 0
    for col, layer in enumerate(dense["layers"].tolist()):
        for m in client.get_metric_history(run_id, names.grad_norm(layer)):
            assert m.value == dense["norms"][row[m.step], col], (layer, m.step)
            compared += 1
    for m in client.get_metric_history(run_id, names.TRAIN_LOSS):
        assert m.value == dense["loss"][row[m.step]]
    assert compared == 5 * 3 + 45 * 2


def test_metric_every_thins_only_the_layers_beyond_the_five_defaults(all_run):
    from pipeline.models import default_layers

    client, run_id = all_run
    tags = client.get_run(run_id).data.tags
    defaults = set(default_layers("resnet50"))
    assert set(tags[names.METRIC_LAYERS_TAG].split(",")) == defaults
    for layer in tags[names.LAYERS_RESOLVED_TAG].split(","):
        steps = sorted(m.step for m in client.get_metric_history(run_id, names.grad_norm(layer)))
        assert steps == ([0, 1, 2] if layer in defaults else [0, 2]), layer
    assert sorted(m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS)) == [0, 1, 2]


def test_a_run_logs_the_heatmap_the_depth_profile_and_the_diagnosis(all_run):
    client, run_id = all_run
    logged = {a.path for folder in ("plots", "gradients")
              for a in client.list_artifacts(run_id, folder)}
    assert {names.GRADIENT_FLOW_PLOT, names.DEPTH_PROFILE_PLOT, names.NORMS_NPZ,
            names.GRADIENT_PLOT} <= logged
    tags = client.get_run(run_id).data.tags
    # The answer is known: a ResNet-50 without skips (and without BatchNorm) passes almost
    # nothing back to its first layers. conv1's norm is ~1e-22 against the head's ~0.2
    # (README, "Compare: the answer"), so the diagnosis is "vanishing", some layer below the
    # head is the first one gone, no step is all zeros, and three steps leave the loss at
    # ln(10), a uniform guess.
    layers = tags[names.LAYERS_RESOLVED_TAG].split(",")
    assert tags[names.HEALTH_TAG] == "vanishing", tags
    assert tags[names.FIRST_VANISHING_TAG] in layers[:-1], tags[names.FIRST_VANISHING_TAG]
    assert 0 < float(tags[names.FIRST_TO_LAST_TAG]) < 1e-18, tags[names.FIRST_TO_LAST_TAG]
    assert float(tags[names.ZERO_STEP_FRACTION_TAG]) == 0.0
    assert tags[names.AT_CHANCE_TAG] == "true"


def test_compare_works_on_a_pair_of_layers_all_runs_with_thinned_metrics(tracking_store):
    from mlflow import MlflowClient

    from pipeline import compare, train

    ids = [train.run(Config(model="resnet18", skip=skip, layers=ALL_LAYERS, metric_every=2,
                            **TINY)) for skip in (False, True)]
    compare_id = compare.compare(run_ids=ids)
    client = MlflowClient()
    # resnet18: 17 convs + fc run in both variants (the 3 downsample convs only with skip)
    assert len(client.get_run(compare_id).data.tags["compare.layers"].split(",")) == 18
    assert client.get_run(compare_id).info.status == "FINISHED"
    # both runs have every layer in norms.npz: the difference heatmap has all 18 shared
    # layers, while the per-layer panels are capped at 8 (tests/test_compare_heatmap.py)
    tags = client.get_run(compare_id).data.tags
    assert tags[names.DIFFERENCE_TAG] == "logged"
    assert names.DIFFERENCE_PLOT in {a.path for a in client.list_artifacts(compare_id, "comparison")}
    assert "for 18 layers x" in tags[names.NOTE_TAG]
    assert len(tags[names.PANEL_LAYERS_TAG].split(",")) == 8


def test_explicit_layers_are_all_logged_every_step_and_fill_the_dense_artifact(tracking_store, tmp_path):
    from mlflow import MlflowClient

    from pipeline import train

    run_id = train.run(Config(model="resnet18", layers=("conv1", "layer2.0.conv1", "fc"),
                              metric_every=2, **TINY))
    client = MlflowClient()
    dense = _load_npz(client, run_id, tmp_path)
    assert dense["layers"].tolist() == ["conv1", "layer2.0.conv1", "fc"]
    for col, layer in enumerate(dense["layers"].tolist()):
        history = sorted((m.step, m.value) for m in client.get_metric_history(
            run_id, names.grad_norm(layer)))
        assert history == list(zip(dense["steps"].tolist(), dense["norms"][:, col].tolist()))
    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {names.GRADIENT_FLOW_PLOT, names.DEPTH_PROFILE_PLOT} <= logged


# --- the collector -------------------------------------------------------------------------
def test_the_collector_keeps_chunks_in_step_order_from_a_resumed_step():
    c = Collector(("a", "b"), ("a", "b"), metric_every=1)
    c(12, [0, 0], np.array([[3.0, 4.0, 9.0], [5.0, 6.0, 8.0]]))
    c(10, [0, 0], np.array([[1.0, 2.0, 7.0], [1.5, 2.5, 7.5]]))
    dense = c.dense()
    assert dense["steps"].tolist() == [10, 11, 12, 13]
    assert dense["norms"][:, 0].tolist() == [1.0, 1.5, 3.0, 5.0]
    assert dense["loss"].tolist() == [7.0, 7.5, 9.0, 8.0]
    assert c.take_pending() == []  # nothing thinned when every layer is an every-step one


def test_the_console_warns_once_when_every_layer_below_the_head_goes_to_zero():
    lines: list[str] = []
    c = Collector(("conv1", "conv2", "fc"), ("conv1", "conv2", "fc"), metric_every=1,
                  warn=lines.append)
    alive = np.array([[1e-3, 1e-2, 1e-1, 2.3]] * 10)
    dead = np.array([[0.0, 0.0, 1e-1, 2.3]] * 15)
    c(0, [0] * 10, alive)
    c(10, [0] * 15, dead)
    assert lines == []  # 15 dead steps: not yet
    c(25, [0] * 15, dead)
    c(40, [0] * 15, dead)
    assert len(lines) == 1 and "step 10" in lines[0] and "fc" in lines[0]


def test_a_gap_of_life_resets_the_dead_count():
    lines: list[str] = []
    c = Collector(("a", "fc"), ("a", "fc"), metric_every=1, warn=lines.append)
    row = lambda a: [a, 1.0, 2.3]  # noqa: E731
    c(0, [0] * 39, np.array([row(0.0)] * 19 + [row(1e-5)] + [row(0.0)] * 19))
    assert lines == []


# --- the diagnosis ------------------------------------------------------------------------
def _history(first, middle, last, steps=100, loss=1.0):
    norms = np.tile(np.array([first, middle, last], dtype=np.float64), (steps, 1))
    return np.arange(steps), ["conv1", "layer1.0.conv1", "fc"], norms, np.full(steps, loss)


def test_a_flat_gradient_is_healthy():
    tags = diagnose(*_history(0.5, 0.8, 1.0), num_classes=10)
    assert tags[names.HEALTH_TAG] == "healthy"
    assert tags[names.FIRST_VANISHING_TAG] == "none"
    assert float(tags[names.FIRST_TO_LAST_TAG]) == 0.5
    assert tags[names.ZERO_STEP_FRACTION_TAG] == "0"
    assert tags[names.AT_CHANCE_TAG] == "false"


def test_vanishing_names_the_layer_nearest_the_head_that_lost_its_gradient():
    tags = diagnose(*_history(1e-25, 1e-20, 1.0), num_classes=10)
    assert tags[names.HEALTH_TAG] == "vanishing"
    assert tags[names.FIRST_VANISHING_TAG] == "layer1.0.conv1"
    assert math.isclose(float(tags[names.FIRST_TO_LAST_TAG]), 1e-25)


def test_a_layer_far_above_the_head_is_exploding():
    tags = diagnose(*_history(1e5, 1.0, 1.0), num_classes=10)
    assert tags[names.HEALTH_TAG] == "exploding"


def test_zero_gradient_below_the_head_on_most_steps_is_dead():
    steps, layers, norms, loss = _history(0.1, 0.1, 1.0)
    norms[40:, :2] = 0.0
    tags = diagnose(steps, layers, norms, loss, num_classes=10)
    assert tags[names.HEALTH_TAG] == "dead"
    assert tags[names.ZERO_STEP_FRACTION_TAG] == "0.6"


def test_a_loss_stuck_at_ln_num_classes_is_at_chance():
    steps, layers, norms, loss = _history(0.5, 0.8, 1.0, loss=math.log(10) * 1.005)
    loss[:50] = 5.0  # only the last 10% counts
    assert diagnose(steps, layers, norms, loss, num_classes=10)[names.AT_CHANCE_TAG] == "true"
    assert diagnose(steps, layers, norms, loss * 1.05, 10)[names.AT_CHANCE_TAG] == "false"


def test_the_diagnosis_uses_compares_thresholds():
    from pipeline import health, stats

    assert stats.status is health.status  # one rule, in health; the diagnosis is health's


# --- the plots ----------------------------------------------------------------------------
def test_the_heatmap_shows_zeros_as_the_floor_and_says_so():
    from pipeline import plots

    norms = np.array([[0.0, 1e-3, 1.0], [1e-6, 1e-2, 1.0]])
    fig = plots.gradient_flow([0, 1], ["a", "b", "fc"], norms, "t")
    try:
        label = fig.axes[-1].get_ylabel()
        assert "black = exactly zero" in label and "drawn as -7" in label
        image = fig.axes[0].images[0]
        assert image.get_array().min() == -7 < image.norm.vmin  # below the scale: black
    finally:
        plots.close(fig)
    assert plots.profile_steps(range(101)) == [0, 25, 50, 100]
    assert plots.profile_steps(range(2)) == [0, 1]


def test_a_resumed_run_has_the_dense_artifact_of_the_steps_since_the_resume(tracking_store,
                                                                            monkeypatch, tmp_path):
    import os
    import signal

    from mlflow import MlflowClient

    from pipeline import progress, train

    step = progress.Progress.step

    def interrupt_at_1(self, at):  # SIGINT during step 1: the run stops after it
        step(self, at)
        if at == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(progress.Progress, "step", interrupt_at_1)
    with pytest.raises(KeyboardInterrupt):
        train.run(Config(model="resnet18", **{**TINY, "max_steps": 4}))
    monkeypatch.setattr(progress.Progress, "step", step)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("gradient-flow").experiment_id])
    stopped_by = run.data.tags[names.ERROR_TAG]
    train.run(Config(resume=run.info.run_id, model="resnet18", device="cpu"))
    tags = client.get_run(run.info.run_id).data.tags
    # FINISHED now: the stop's reason is history, not an error of the run.
    assert names.ERROR_TAG not in tags and tags[names.RESUMED_ERROR_TAG] == stopped_by
    dense = _load_npz(client, run.info.run_id, tmp_path)
    assert dense["steps"].tolist() == list(range(int(tags[names.RESUMED_AT_TAG]), 4))
    assert 0 < len(dense["steps"]) < 4
    losses = sorted(m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS))
    assert losses == [0, 1, 2, 3]  # the metrics cover the whole run


def _stopped_after_its_last_step(tracking_store) -> str:
    """A run as if stopped after its last step, before it ended (a FINISHED run is refused,
    and has deleted its local checkpoint): its last checkpoint back in place, the run KILLED."""
    from mlflow import MlflowClient

    from pipeline import train

    cfg = Config(model="resnet18", **{**TINY, "max_steps": 3, "log_checkpoint": "true"})
    run_id = train.run(cfg)
    client = MlflowClient()
    logged = client.download_artifacts(run_id, names.CHECKPOINT_ARTIFACT, str(tracking_store.dir))
    local = checkpoint.path_for(cfg.checkpoint_dir, run_id)
    local.parent.mkdir(parents=True)
    shutil.copyfile(logged, local)
    client.set_terminated(run_id, "KILLED")
    return run_id


def test_resuming_a_run_that_reached_max_steps_trains_no_further_step(tracking_store):
    from mlflow import MlflowClient

    from pipeline import train

    run_id = _stopped_after_its_last_step(tracking_store)
    client = MlflowClient()
    train.run(Config(resume=run_id, device="cpu"))
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key))
             for key in (names.TRAIN_LOSS, names.EPOCH_SECONDS)}
    assert steps == {names.TRAIN_LOSS: [0, 1, 2], names.EPOCH_SECONDS: [0]}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_resume_that_another_resume_finished_meanwhile_is_refused_and_leaves_it_finished(
        tracking_store):
    from mlflow import MlflowClient

    from pipeline import distributed, plan, train

    run_id = _stopped_after_its_last_step(tracking_store)
    client = MlflowClient()
    slow = plan.resolve(Config(resume=run_id, device="cpu"))  # checked: resumable then
    train.run(Config(resume=run_id, device="cpu"))  # the other resume, done first
    finished = client.get_run(run_id)
    with pytest.raises(ConfigError, match="^resume: .*(FINISHED|no checkpoint)"):
        train._run(slow, distributed.Comm(distributed.World(), slow.device), None)
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags == finished.data.tags
    assert not checkpoint.path_for(slow.cfg.checkpoint_dir, run_id).parent.exists()
