"""compare's `quantity`: which gradient norms a skip and a no-skip run are compared on.

Training's `probe=output|weight|both` decides what a run holds (``grad_norm/*`` and/or
``weight_grad_norm/*`` metrics, ``norms`` and/or ``weight_norms`` in gradients/norms.npz).
Every test here reads real tiny training runs (resnet18, 32 px, 4 batches of 4 synthetic
images, two epochs), trained once for the module into one sqlite store, one experiment per
`probe` value; the numbers are checked against the runs' own metric histories.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import compare, names, param_diff, plots, query, workflow
from pipeline.config import CompareConfig, Config, ConfigError, parse, to_params
from pipeline.query import QueryError
from runs_helpers import (Store, deactivate_store, describe, new_store, run_mlflow,
                          subprocess_env)

TINY = dict(model="resnet18", dataset="synthetic", image_size=32, epochs=2, batch_size=4,
            synthetic_size=8, synthetic_test_size=4, max_steps=4, num_workers="0",
            flush_every=2, device="cpu", log_model="false")
PROBES = ("output", "weight", "both")

OUTPUT_ARTIFACTS = {compare.NORMS_PLOT, compare.DEPTH_PLOT, compare.DIFFERENCE_PLOT,
                    compare.SUMMARY_MD, compare.SUMMARY_CSV, compare.SUMMARY_JSON,
                    compare.EPOCHS_CSV}
WEIGHT_ARTIFACTS = {"comparison/weight_gradient_norms.png", "comparison/weight_depth_profile.png",
                    "comparison/weight_gradient_flow_difference.png",
                    "comparison/weight_summary.md", "comparison/weight_summary.csv",
                    "comparison/weight_summary.json", "comparison/weight_per_epoch.csv"}


def cfg(probe: str, skip: bool) -> Config:
    return Config(skip=skip, probe=probe, experiment=f"probe-{probe}", **TINY)


@dataclasses.dataclass
class Trained:
    store: Store
    ids: dict[str, dict[str, str]]   # probe -> variant -> run ID

    def runs(self, probe: str) -> list[str]:
        return [self.ids[probe]["noskip"], self.ids[probe]["skip"]]

    def all_runs(self) -> dict[str, object]:
        client = self.store.client
        exps = [e.experiment_id for e in client.search_experiments()]
        return {r.info.run_id: r for r in client.search_runs(exps, max_results=1000)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A noskip and a skip run for each `probe` value, each pair in experiment probe-<probe>."""
    from pipeline import train

    directory = tmp_path_factory.mktemp("quantity_store")
    with pytest.MonkeyPatch.context() as mp:
        store = new_store(directory, mp, tmp_path_factory)
        try:
            ids = {p: {("skip" if s else "noskip"): train.run(cfg(p, s)) for s in (False, True)}
                   for p in PROBES}
            yield Trained(store, ids)
        finally:
            deactivate_store()


# --- reading back ------------------------------------------------------------------------------
def artifacts(store: Store, run_id: str) -> set[str]:
    return {f.path for f in store.client.list_artifacts(run_id, "comparison")}


def local(store: Store, run_id: str, path: str) -> Path:
    return Path(store.client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / path


def history(store: Store, run_id: str, key: str) -> np.ndarray:
    points = sorted(store.client.get_metric_history(run_id, key), key=lambda p: p.step)
    return np.array([p.value for p in points])


def status(median: float, zero_fraction: float, reference: float) -> str:
    """The README's rule, written out again here: median / the output-side layer's median."""
    if zero_fraction >= 0.5:
        return "Dead"
    ratio = median / reference
    for label, below in (("Vanishing", 1e-18), ("Tiny", 1e-9), ("Weak", 1e-3)):
        if ratio < below:
            return label
    return "Exploding" if ratio > 1e3 else "Healthy"


def assert_table_matches_metrics(store: Store, table: pd.DataFrame, runs: dict[str, str],
                                 key) -> None:
    """Every row of a summary table against the metric ``key(layer)`` of its run."""
    for variant, run_id in runs.items():
        layers = store.client.get_run(run_id).data.tags[names.LAYERS_RESOLVED_TAG].split(",")
        rows = table[table["variant"] == variant]
        assert rows["layer"].tolist() == layers, variant  # input side first, the head last
        reference = np.median(history(store, run_id, key(layers[-1])))
        for r in rows.itertuples():
            v = history(store, run_id, key(r.layer))
            assert len(v) == r.steps == TINY["max_steps"]
            assert r.run_id == run_id
            for got, want in ((r.median, np.median(v)), (r.min, v.min()), (r.max, v.max()),
                              (r.first, v[0]), (r.last, v[-1])):
                assert got == pytest.approx(want, rel=1e-12, abs=0), (variant, r.layer)
            assert r.status == status(np.median(v), np.mean(v == 0), reference), r.layer


# --- weight-only runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weight_compare(trained) -> str:
    """quantity left at auto, the runs chosen by experiment: what a user types first."""
    return compare.compare(experiment="probe-weight")


def test_two_runs_trained_with_probe_weight_compare_on_their_weight_gradients(
        trained, weight_compare):
    store, cid = trained.store, weight_compare
    run = store.client.get_run(cid)
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.QUANTITY_TAG] == "weight"
    assert run.data.tags[names.WEIGHT_DIFFERENCE_TAG] == "logged"
    assert names.DIFFERENCE_TAG not in run.data.tags  # no output-gradient heatmap to speak of
    assert artifacts(store, cid) == WEIGHT_ARTIFACTS
    table = pd.read_csv(local(store, cid, compare.WEIGHT_SUMMARY_CSV))
    assert_table_matches_metrics(store, table, trained.ids["weight"], names.weight_grad_norm)


def test_weight_comparison_summary_says_what_it_compares_and_how_status_is_judged(
        trained, weight_compare):
    store, cid = trained.store, weight_compare
    note = store.client.get_run(cid).data.tags[names.NOTE_TAG]
    assert note == local(store, cid, compare.WEIGHT_SUMMARY_MD).read_text()
    assert note.startswith("## Weight-gradient norms: skip vs no skip")
    assert "Input-side layer `conv1`" in note  # the diagnosis
    assert "Weight-gradient norms get the same rule" in note
    data = json.loads(local(store, cid, compare.WEIGHT_SUMMARY_JSON).read_text())
    assert data["quantity"] == "weight"
    assert data["runs"] == trained.ids["weight"]
    table = pd.read_csv(local(store, cid, compare.WEIGHT_SUMMARY_CSV))
    assert list(pd.DataFrame(data["summary"]).columns) == list(table.columns)
    per_epoch = pd.read_csv(local(store, cid, compare.WEIGHT_EPOCHS_CSV))
    assert sorted(per_epoch["epoch"].unique()) == [0, 1]


def test_weight_difference_heatmap_is_the_log10_difference_of_the_runs_weight_gradient_metrics(
        trained, weight_compare):
    store = trained.store
    ids = trained.ids["weight"]
    dense = {v: query.dense_norms(r) for v, r in ids.items()}
    assert all("norms" not in d for d in dense.values())  # probe=weight: weight_norms only
    d = plots.difference_matrix(dense["noskip"], dense["skip"], key="weight_norms")
    layers = store.client.get_run(ids["noskip"]).data.tags[names.LAYERS_RESOLVED_TAG].split(",")
    assert d.layers == layers
    metric = {v: np.array([history(store, r, names.weight_grad_norm(x)) for x in layers])
              for v, r in ids.items()}
    np.testing.assert_allclose(d.diff, np.log10(metric["skip"]) - np.log10(metric["noskip"]),
                               rtol=0, atol=1e-12)
    from PIL import Image
    with Image.open(local(store, weight_compare, names.WEIGHT_DIFFERENCE_PLOT)) as im:
        assert im.format == "PNG" and min(im.size) > 300


def test_weight_status_of_a_layer_does_not_depend_on_which_other_layers_are_compared(
        trained, weight_compare):
    store = trained.store
    full = pd.read_csv(local(store, weight_compare, compare.WEIGHT_SUMMARY_CSV))
    cid = compare.compare(run_ids=trained.runs("weight"), layers=["conv1"], quantity="weight")
    subset = pd.read_csv(local(store, cid, compare.WEIGHT_SUMMARY_CSV))
    assert subset["layer"].tolist() == ["conv1", "conv1"]
    for r in subset.itertuples():  # still relative to fc, which was not asked for
        assert r.status == full[(full.layer == "conv1") & (full.variant == r.variant)].iloc[0].status


# --- probe=both ---------------------------------------------------------------------------------
def test_auto_compares_output_gradients_when_both_runs_have_them(trained):
    store = trained.store
    cid = compare.compare(run_ids=trained.runs("both"))
    run = store.client.get_run(cid)
    assert run.data.tags[names.QUANTITY_TAG] == "output"
    assert artifacts(store, cid) == OUTPUT_ARTIFACTS
    note = run.data.tags[names.NOTE_TAG]
    assert note == local(store, cid, compare.SUMMARY_MD).read_text()
    assert note.startswith("## Gradient norms: skip vs no skip")
    assert "Weight-gradient" not in note
    table = pd.read_csv(local(store, cid, compare.SUMMARY_CSV))
    assert_table_matches_metrics(store, table, trained.ids["both"], names.grad_norm)


def test_quantity_both_compares_output_and_weight_gradients_with_both_sets_of_artifacts(trained):
    store = trained.store
    params = to_params(parse(CompareConfig, {"runs": ",".join(trained.runs("both")),
                                             "quantity": "both"}))
    cid = compare.compare(run_ids=trained.runs("both"), params=params, quantity="both")
    run = store.client.get_run(cid)
    assert run.info.status == "FINISHED"
    assert run.data.params["quantity"] == "both"
    assert run.data.tags[names.QUANTITY_TAG] == "both"
    assert run.data.tags[names.DIFFERENCE_TAG] == run.data.tags[names.WEIGHT_DIFFERENCE_TAG] \
        == "logged"
    assert artifacts(store, cid) == OUTPUT_ARTIFACTS | WEIGHT_ARTIFACTS
    output = pd.read_csv(local(store, cid, compare.SUMMARY_CSV))
    weight = pd.read_csv(local(store, cid, compare.WEIGHT_SUMMARY_CSV))
    assert list(output.columns) == list(weight.columns)  # one format for both quantities
    assert_table_matches_metrics(store, output, trained.ids["both"], names.grad_norm)
    assert_table_matches_metrics(store, weight, trained.ids["both"], names.weight_grad_norm)
    note = run.data.tags[names.NOTE_TAG]
    md = {p: local(store, cid, p).read_text() for p in (compare.SUMMARY_MD,
                                                        compare.WEIGHT_SUMMARY_MD)}
    # The description is both summaries, with the line on the runs' params said once.
    said = param_diff.params_note([]) + "\n\n"
    assert said in md[compare.WEIGHT_SUMMARY_MD] and note.count(said) == 1
    assert note == md[compare.SUMMARY_MD] + "\n" + md[compare.WEIGHT_SUMMARY_MD].replace(said, "")


def test_all_with_probe_both_compares_both_quantities_of_the_runs_it_reuses(trained):
    before = trained.all_runs()
    parent = workflow.run_all(cfg("both", False), force=False)
    after = trained.all_runs()
    tags = after[parent].data.tags
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "true"
    compared = after[tags["all.compare_run"]]
    assert set(after) - set(before) == {parent, compared.info.run_id}  # nothing retrained
    assert compared.data.params["quantity"] == "both"
    assert artifacts(trained.store, compared.info.run_id) == OUTPUT_ARTIFACTS | WEIGHT_ARTIFACTS


# --- refusals -----------------------------------------------------------------------------------
def test_auto_refuses_runs_that_hold_no_common_quantity_naming_what_each_has(trained):
    before = set(trained.all_runs())
    noskip, skip = trained.ids["output"]["noskip"], trained.ids["weight"]["skip"]
    with pytest.raises(QueryError) as err:
        compare.compare(run_ids=[noskip, skip])
    line = str(err.value)
    assert line.startswith("quantity: auto") and "\n" not in line
    assert f"the noskip run {noskip} has output-gradient norms (grad_norm/*)" in line
    assert f"the skip run {skip} has weight-gradient norms (weight_grad_norm/*)" in line
    assert set(trained.all_runs()) == before


def test_an_unknown_quantity_from_python_is_refused_naming_the_parameter(trained):
    with pytest.raises(ConfigError, match="quantity: 'grad' is not allowed; allowed: auto, "
                                          "output, weight, both"):
        compare.compare(run_ids=trained.runs("weight"), quantity="grad")


def test_asking_for_weight_gradients_of_output_only_runs_exits_2_with_one_line_and_no_run(
        trained):
    store = trained.store
    before = trained.all_runs()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "compare", "--experiment",
                           "probe-output", "--quantity", "weight"], cwd=store.dir,
                          env=subprocess_env(store), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, describe(proc)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr
    noskip, skip = trained.ids["output"]["noskip"], trained.ids["output"]["skip"]
    assert lines[0] == (
        "error: quantity: weight needs weight-gradient norms (weight_grad_norm/*) in both runs; "
        f"the noskip run {noskip} has output-gradient norms (grad_norm/*), the skip run {skip} "
        "has output-gradient norms (grad_norm/*); compare quantity=output, or train both with "
        "probe=weight")
    after = trained.all_runs()
    assert set(after) == set(before), "a refused compare must not leave a run"
    assert all(r.info.status != "RUNNING" for r in after.values())


@pytest.mark.slow
def test_mlflow_run_compare_with_a_quantity_the_runs_lack_ends_its_run_failed(trained):
    store = trained.store
    proc = run_mlflow(store, "compare", {"experiment": "probe-output", "quantity": "both"})
    assert proc.returncode != 0, describe(proc)
    assert "error: quantity: both needs" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr
    opened = [r for r in trained.all_runs().values() if r.data.params.get("quantity") == "both"
              and r.data.tags.get("mlflow.project.entryPoint") == "compare"]
    assert len(opened) == 1, describe(proc)
    assert opened[0].info.status == "FAILED"
    assert opened[0].data.tags[names.ERROR_TAG].startswith("quantity: both needs")
