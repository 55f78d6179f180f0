"""The compare step's difference heatmap (comparison/gradient_flow_difference.png) and the
cap on the per-layer panels of comparison/gradient_norms.png.

The heatmap's numbers come from a pure function (``plots.difference_matrix``), checked here
against log10 differences computed independently; the end-to-end tests use real sqlite
stores: runs made by ``runs_helpers.make_training_run`` with a ``gradients/norms.npz``
logged as the training step logs it, and the session's real trained pair.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import compare, gradient_flow, names, plots, query, summary
from runs_helpers import (Store, deactivate_store, level, make_training_run,  # noqa: F401
                          mlflow_store, new_store, trained_pair)

# Twelve layers, input side first: more than the panel cap (8).
LAYERS = ["conv1", *(f"layer{b}.{i}.conv{c}" for b in (1, 2) for i in (0, 1) for c in (1, 2)),
          "layer3.0.conv1", "layer3.0.conv2", "fc"]
STEPS = 30

def artifact_dir(store: Store, run_id: str) -> Path:
    return Path(store.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))


def read_csv(store: Store, run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(artifact_dir(store, run_id) / "comparison" / name)


def npz_dict(steps, layers, norms) -> dict[str, np.ndarray]:
    norms = np.asarray(norms, dtype=np.float64)
    return {"steps": np.asarray(steps, dtype=np.int64), "layers": np.array(layers, dtype=str),
            "norms": norms, "loss": np.full(len(steps), 2.3)}


def log_norms_npz(store: Store, run_id: str, arrays: dict[str, np.ndarray], tmp_path) -> None:
    """Log ``arrays`` as the run's gradients/norms.npz, written as the training step writes it."""
    folder = tmp_path / run_id
    folder.mkdir()
    gradient_flow.save_npz(folder / "norms.npz", arrays)
    store.client.log_artifact(run_id, str(folder / "norms.npz"), "gradients")


def deep_pair(store: Store, tmp_path, with_npz=("noskip", "skip"), seed: int = 0):
    """A noskip and a skip run over LAYERS: without skips the norm falls a decade per layer
    toward the input; with skips it stays near 1, except conv1, which is exactly 0 on the
    last 5 steps. Each run in ``with_npz`` gets a norms.npz equal to its metrics."""
    rng = np.random.default_rng(seed)
    depth = len(LAYERS)
    noskip = {layer: level(rng, 10.0 ** -(depth - 1 - i), STEPS) for i, layer in enumerate(LAYERS)}
    skip = {layer: level(rng, 1.0, STEPS) for layer in LAYERS}
    skip["conv1"][-5:] = 0.0
    exp = store.project_experiment_id()
    runs = {v: make_training_run(store.client, exp, v, h, steps_per_epoch=15, seed=i)
            for i, (v, h) in enumerate((("noskip", noskip), ("skip", skip)))}
    for variant in with_npz:
        h = runs[variant].histories
        log_norms_npz(store, runs[variant].run_id,
                      npz_dict(np.arange(STEPS), LAYERS, np.column_stack([h[x] for x in LAYERS])),
                      tmp_path)
    return runs


# --- the matrix ----------------------------------------------------------------------------------
def test_difference_matrix_is_log10_skip_minus_log10_noskip_over_shared_layers_and_steps():
    rng = np.random.default_rng(1)
    a_layers = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    b_layers = ["conv1", "layer1.0.conv1", "layer1.0.downsample.0", "layer1.0.conv2", "fc"]
    a_steps, b_steps = np.arange(0, 12), np.arange(4, 20)  # a resumed skip run: steps 4..19
    a = 10.0 ** rng.uniform(-22, 0, (len(a_steps), len(a_layers)))
    b = 10.0 ** rng.uniform(-5, 1, (len(b_steps), len(b_layers)))
    d = plots.difference_matrix(npz_dict(a_steps, a_layers, a), npz_dict(b_steps, b_layers, b))
    assert d.layers == a_layers  # the downsample conv runs only with skips: not shared
    assert d.steps == 8 and d.per_column == 1
    assert d.edges.tolist() == list(range(4, 13))
    want = np.array([[np.log10(b[s - 4, b_layers.index(x)]) - np.log10(a[s, a_layers.index(x)])
                      for s in range(4, 12)] for x in a_layers])
    np.testing.assert_allclose(d.diff, want, rtol=1e-12, atol=1e-12)
    assert d.floored == {"noskip": 0, "skip": 0}


def test_explicit_layers_restrict_the_rows_and_keep_forward_order():
    steps, layers = np.arange(3), ["conv1", "layer1.0.conv1", "fc"]
    ones = np.ones((3, 3))
    d = plots.difference_matrix(npz_dict(steps, layers, ones), npz_dict(steps, layers, 10 * ones),
                                layers=["fc", "conv1"])
    assert d.layers == ["conv1", "fc"]
    np.testing.assert_array_equal(d.diff, np.ones((2, 3)))


def test_zero_norms_are_floored_one_decade_below_the_smallest_positive_norm_of_either_run():
    steps, layers = np.arange(4), ["conv1", "fc"]
    a = np.array([[1e-21, 1.0], [0.0, 1.0], [1e-20, 1.0], [np.nan, 1.0]])
    b = np.array([[0.0, 2.0], [1e-3, 2.0], [0.0, 2.0], [1e-3, 2.0]])
    d = plots.difference_matrix(npz_dict(steps, layers, a), npz_dict(steps, layers, b))
    assert d.floor == -22.0  # smallest positive 1e-21, in the noskip run
    assert np.isfinite(d.diff).all()
    np.testing.assert_allclose(d.diff[0], [-22 + 21, -3 + 22, -22 + 20, -3 + 22], atol=1e-12)
    np.testing.assert_allclose(d.diff[1], np.log10(2.0), atol=1e-12)
    assert d.floored == {"noskip": 2, "skip": 2}  # the NaN is floored and counted too


def test_wide_runs_are_averaged_into_at_most_max_columns_of_equal_step_count():
    steps, layers = np.arange(1005), ["conv1", "fc"]
    a = np.ones((1005, 2))
    b = 10.0 ** np.column_stack([np.arange(1005) % 10, np.zeros(1005)])  # 0..9 decades, repeating
    d = plots.difference_matrix(npz_dict(steps, layers, a), npz_dict(steps, layers, b),
                                max_columns=100)
    assert d.per_column == 11 and d.diff.shape == (2, 92)
    assert d.edges[0] == 0 and d.edges[-1] == 1005 and np.all(np.diff(d.edges[:-1]) == 11)
    want = [np.mean(np.arange(s, min(s + 11, 1005)) % 10) for s in range(0, 1005, 11)]
    np.testing.assert_allclose(d.diff[0], want, atol=1e-12)
    np.testing.assert_allclose(d.diff[1], 0.0, atol=1e-12)


def test_runs_sharing_no_step_have_no_difference_matrix():
    layers = ["conv1", "fc"]
    a = npz_dict(np.arange(5), layers, np.ones((5, 2)))
    b = npz_dict(np.arange(5, 9), layers, np.ones((4, 2)))
    assert plots.difference_matrix(a, b) is None


def full_default_pair(seed: int = 2) -> tuple[dict, dict]:
    """10 epochs x 3,125 steps x 54 layers, one dead column: what a real default pair gives
    (bench/compare_speed.py times the heatmap on this pair)."""
    rng = np.random.default_rng(seed)
    steps, layers = np.arange(31_250), [f"layer{i}" for i in range(54)]
    a = 10.0 ** rng.uniform(-22, 0, (31_250, 54))
    b = 10.0 ** rng.uniform(-3, 0, (31_250, 54))
    b[20_000:, 0] = 0.0
    return npz_dict(steps, layers, a), npz_dict(steps, layers, b)


def test_a_full_default_runs_difference_heatmap_is_binned_and_drawn_to_a_small_png(tmp_path):
    d = plots.difference_matrix(*full_default_pair())
    fig = plots.difference_heatmap(d, "resnet50", batches_per_epoch=3_125)
    fig.savefig(tmp_path / "difference.png")
    plots.close(fig)
    assert d.diff.shape[1] <= plots.DIFFERENCE_MAX_COLUMNS and d.per_column == 53
    assert (tmp_path / "difference.png").stat().st_size < 1_000_000


# --- the panel cap ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 8, 9, 12, 54])
def test_panels_are_at_most_eight_layers_evenly_across_depth_with_the_first_and_last(n):
    layers = [f"l{i}" for i in range(n)]
    picked = summary.panel_layers(layers)
    assert len(picked) == min(n, 8)
    assert picked[0] == layers[0] and picked[-1] == layers[-1]
    positions = [layers.index(x) for x in picked]
    assert positions == sorted(set(positions))  # forward order, no repeats
    if n > 8:
        gaps = np.diff(positions)
        assert gaps.max() - gaps.min() <= 1, gaps  # evenly spread


# --- end to end, real stores -----------------------------------------------------------------
def test_compare_of_two_runs_with_norms_npz_logs_the_difference_heatmap_and_caps_the_panels(
        mlflow_store, tmp_path):
    runs = deep_pair(mlflow_store, tmp_path)
    cid = compare.compare()
    run = mlflow_store.client.get_run(cid)
    assert run.info.status == "FINISHED"
    listed = {f.path for f in mlflow_store.client.list_artifacts(cid, "comparison")}
    assert names.DIFFERENCE_PLOT in listed
    assert run.data.tags[names.DIFFERENCE_TAG] == "logged"
    from PIL import Image
    with Image.open(artifact_dir(mlflow_store, cid) / names.DIFFERENCE_PLOT) as im:
        assert im.format == "PNG" and min(im.size) > 300
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000) or range(11)) > 10
    # the panels: 8 of 12, first and last included, named in a tag, the JSON and the note
    panels = run.data.tags[names.PANEL_LAYERS_TAG].split(",")
    assert panels == summary.panel_layers(LAYERS) and len(panels) == 8
    assert panels[0] == "conv1" and panels[-1] == "fc"
    note = run.data.tags[names.NOTE_TAG]
    assert "draws 8 of the 12 compared layers" in note
    assert all(f"`{x}`" in note for x in panels)
    # the note states the heatmap's extent and the zeros' floor (skip conv1: 5 zero steps)
    smallest = min(h[h > 0].min() for r in runs.values() for h in r.histories.values())
    assert f"12 layers x {STEPS} shared batches" in note
    assert (f"noskip: 0, skip: 5, are floored at 1e{np.floor(np.log10(smallest)) - 1:g}, one "
            "decade below the smallest positive norm of either run") in note
    # the tables keep every layer
    table = read_csv(mlflow_store, cid, "summary.csv")
    assert table["layer"].drop_duplicates().tolist() == LAYERS


def test_capped_panel_figure_is_as_tall_as_an_eight_layer_comparison(mlflow_store, tmp_path):
    deep_pair(mlflow_store, tmp_path)
    from PIL import Image
    heights = {}
    for key, layers in (("all", None), ("eight", summary.panel_layers(LAYERS))):
        cid = compare.compare(layers=layers)
        with Image.open(artifact_dir(mlflow_store, cid) / "comparison/gradient_norms.png") as im:
            heights[key] = im.size[1]
    assert heights["all"] == heights["eight"], heights


def test_compare_skips_the_heatmap_and_says_why_when_a_run_has_no_norms_npz(mlflow_store, tmp_path):
    runs = deep_pair(mlflow_store, tmp_path, with_npz=("noskip",))
    cid = compare.compare()
    run = mlflow_store.client.get_run(cid)
    assert run.info.status == "FINISHED"
    listed = {f.path for f in mlflow_store.client.list_artifacts(cid, "comparison")}
    assert names.DIFFERENCE_PLOT not in listed
    assert "comparison/gradient_norms.png" in listed
    reason = f"run {runs['skip'].run_id} (skip) has no {names.NORMS_NPZ}"
    assert run.data.tags[names.DIFFERENCE_TAG].startswith("skipped: " + reason)
    note = run.data.tags[names.NOTE_TAG]
    assert f"`{names.DIFFERENCE_PLOT}` not drawn: {reason}" in note
    # still capped; the note no longer promises a heatmap
    assert "draws 8 of the 12 compared layers" in note
    assert "so does the difference heatmap" not in note


def test_real_training_runs_heatmap_data_is_the_log10_difference_of_their_metrics(
        trained_pair, tmp_path, monkeypatch, tmp_path_factory):
    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=trained_pair.dir)
    try:
        cid = compare.compare()
        client = store.client
        assert client.get_run(cid).data.tags[names.DIFFERENCE_TAG] == "logged"
        assert names.DIFFERENCE_PLOT in {f.path for f in client.list_artifacts(cid, "comparison")}
        dense = {v: query.dense_norms(r) for v, r in (("noskip", trained_pair.noskip),
                                                     ("skip", trained_pair.skip))}
        d = plots.difference_matrix(dense["noskip"], dense["skip"])
        layers = client.get_run(trained_pair.noskip).data.tags["layers.resolved"].split(",")
        assert d.layers == layers
        def history(run_id: str, layer: str) -> list[float]:
            points = client.get_metric_history(run_id, f"grad_norm/{layer}")
            return [p.value for p in sorted(points, key=lambda p: p.step)]
        metric = {v: np.array([history(r, x) for x in layers])
                  for v, r in (("noskip", trained_pair.noskip), ("skip", trained_pair.skip))}
        assert d.diff.shape == metric["skip"].shape
        assert (metric["noskip"] > 0).all() and (metric["skip"] > 0).all()
        np.testing.assert_allclose(d.diff, np.log10(metric["skip"]) - np.log10(metric["noskip"]),
                                   rtol=0, atol=1e-12)
    finally:
        deactivate_store()


def test_dense_norms_of_a_run_without_the_artifact_is_none(mlflow_store):
    run = make_training_run(mlflow_store.client, mlflow_store.project_experiment_id(), "skip",
                            {"conv1": np.ones(3), "fc": np.ones(3)}, 3)
    assert query.dense_norms(run.run_id) is None
