"""The compare step: two training runs in; plots, tables and a diagnosis out, in MLflow.

Most tests use runs whose ``grad_norm`` histories the test chose (runs_helpers), and check
the compare run's tables against statistics computed here from those histories with the
rule that compare.py's docstring (and the README) states:

    a layer's median norm / the median norm of the run's output-side probed layer (fc)
    over the same steps;  Dead: >= half the steps exactly 0;  Vanishing < 1e-18;
    Tiny < 1e-9;  Weak < 1e-3;  Exploding > 1e3 (or non-finite);  Healthy otherwise.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import compare, names
from pipeline.query import QueryError
from runs_helpers import (FakeRun, Store, deactivate_store, describe,
                          level, make_pair, make_plain_run, make_training_run, mlflow_store,
                          new_store, run_mlflow, subprocess_env, trained_pair)  # noqa: F401

ARTIFACTS = ("comparison/gradient_norms.png", "comparison/depth_profile.png",
             "comparison/summary.md", "comparison/summary.csv", "comparison/summary.json",
             "comparison/per_epoch.csv")
FINALS = ("train/accuracy", "train/loss", "test/accuracy", "test/loss")


# --- the expectation, computed independently of pipeline.compare -----------------------------
def expected_status(median: float, zero_fraction: float, reference: float) -> str:
    if zero_fraction >= 0.5:
        return "Dead"
    if not math.isfinite(median):
        return "Exploding"
    ratio = median / reference
    if ratio < 1e-18:
        return "Vanishing"
    if ratio < 1e-9:
        return "Tiny"
    if ratio < 1e-3:
        return "Weak"
    if ratio > 1e3:
        return "Exploding"
    return "Healthy"


def expected_stats(values: np.ndarray, reference_values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    k = max(1, len(v) // 10)
    median, zeros = float(np.median(v)), float(np.mean(v == 0))
    return {"steps": len(v), "median": median, "min": float(np.min(v)), "max": float(np.max(v)),
            "first": float(v[0]), "last": float(v[-1]),
            "early_median": float(np.median(v[:k])), "late_median": float(np.median(v[-k:])),
            "zero_fraction": zeros,
            "status": expected_status(median, zeros, float(np.median(reference_values)))}


def expected_epochs(run: FakeRun, layers, reference="fc") -> dict[tuple[str, int], dict]:
    out = {}
    n = len(run.histories[reference])
    spe = run.steps_per_epoch
    for epoch in range(-(-n // spe)):
        sl = slice(epoch * spe, (epoch + 1) * spe)
        for layer in layers:
            s = expected_stats(run.histories[layer][sl], run.histories[reference][sl])
            out[(layer, epoch)] = s
    return out


# --- reading the compare run back ---------------------------------------------------------------
def artifact_dir(store: Store, run_id: str) -> Path:
    uri = store.client.get_run(run_id).info.artifact_uri
    path = Path(uri.removeprefix("file://"))
    assert path.is_dir(), f"compare run {run_id} has no local artifact directory {path}"
    return path


def read_csv(store: Store, run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(artifact_dir(store, run_id) / "comparison" / name)


def row(table: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        mask &= (table[k] == v).to_numpy()
    assert mask.sum() == 1, f"expected one row for {where}, found {mask.sum()}"
    return table[mask].iloc[0]


@pytest.fixture
def compared(mlflow_store):
    """A noskip and a skip run (2 epochs x 10 steps, see collapse_histories), compared."""
    runs = make_pair(mlflow_store)
    compare_id = compare.compare()
    return mlflow_store, runs, compare_id


# --- outputs ------------------------------------------------------------------------------------
def test_compare_writes_plots_and_tables_as_artifacts_of_its_own_finished_run(compared):
    store, runs, compare_id = compared
    run = store.client.get_run(compare_id)
    assert run.info.status == "FINISHED"
    assert compare_id not in {r.run_id for r in runs.values()}
    base = artifact_dir(store, compare_id)
    assert base.is_relative_to(store.dir), "artifacts should land in the test's own store"
    listed = {f.path for f in store.client.list_artifacts(compare_id, "comparison")}
    assert listed == set(ARTIFACTS)
    from PIL import Image
    for name in ("gradient_norms.png", "depth_profile.png"):
        with Image.open(base / "comparison" / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
            colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is None or len(colours) > 10, f"{name} looks blank"
    # nothing was written onto the training runs
    for r in runs.values():
        assert not store.client.list_artifacts(r.run_id)


def test_gradient_norm_figure_has_one_panel_per_compared_layer(mlflow_store):
    runs = make_pair(mlflow_store)
    from PIL import Image
    heights = {}
    for layers in (["fc"], ["conv1", "layer1.0.conv1", "fc"]):
        cid = compare.compare(layers=layers)
        with Image.open(artifact_dir(mlflow_store, cid) / "comparison/gradient_norms.png") as im:
            heights[len(layers)] = im.size[1]
    assert heights[3] > 2 * heights[1], heights


def test_compare_run_is_tagged_with_the_ids_of_the_runs_it_compares(compared):
    store, runs, compare_id = compared
    tags = store.client.get_run(compare_id).data.tags
    assert tags["compare.noskip_run"] == runs["noskip"].run_id
    assert tags["compare.skip_run"] == runs["skip"].run_id
    assert tags["compare.runs"].split(",") == [runs["noskip"].run_id, runs["skip"].run_id]
    assert tags["mlflow.runName"] == "compare-resnet50"


def test_compare_note_holds_the_markdown_summary_table(compared):
    store, runs, compare_id = compared
    note = store.client.get_run(compare_id).data.tags["mlflow.note.content"]
    md = (artifact_dir(store, compare_id) / "comparison/summary.md").read_text()
    assert note == md
    table = read_csv(store, compare_id, "summary.csv")
    header = next(line for line in note.splitlines() if line.startswith("| layer | variant"))
    for word in ("median", "min", "max", "first", "last", "skip/noskip", "status"):
        assert word in header
    for r in table.itertuples():
        line = next((x for x in note.splitlines() if x.startswith(f"| `{r.layer}` | {r.variant} |")),
                    None)
        assert line is not None, f"no markdown row for {r.layer} {r.variant}"
        assert line.rstrip().endswith(f"| {r.status} |")
        assert f"{r.median:.3g}" in line
    for r in runs.values():
        assert r.run_id in note


def test_summary_csv_numbers_equal_statistics_computed_from_the_histories(compared):
    store, runs, compare_id = compared
    table = read_csv(store, compare_id, "summary.csv")
    layers = ["conv1", "layer1.0.conv1", "fc"]
    assert len(table) == 2 * len(layers)
    assert table["layer"].tolist() == [x for x in layers for _ in range(2)]  # input side first
    assert table["variant"].tolist() == ["noskip", "skip"] * len(layers)
    medians = {(v, layer): float(np.median(runs[v].histories[layer]))
               for v in runs for layer in layers}
    for variant, run in runs.items():
        for layer in layers:
            got = row(table, layer=layer, variant=variant)
            want = expected_stats(run.histories[layer], run.histories["fc"])
            assert got["run_id"] == run.run_id
            for key, value in want.items():
                if isinstance(value, str):
                    assert got[key] == value, (layer, variant, key)
                else:
                    assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (layer, variant, key)
            assert got["skip_over_noskip"] == pytest.approx(
                medians[("skip", layer)] / medians[("noskip", layer)], rel=1e-12)
            for key in FINALS:
                assert got[key] == pytest.approx(run.finals[key], rel=1e-12), (variant, key)


def test_summary_shows_vanishing_and_tiny_without_skips_and_dead_with_skips(compared):
    # The story the designed histories tell, spelled out (the exact numbers are checked above).
    store, _, compare_id = compared
    table = read_csv(store, compare_id, "summary.csv")
    status = {(r.layer, r.variant): r.status for r in table.itertuples()}
    assert status[("conv1", "noskip")] == "Vanishing"
    assert status[("layer1.0.conv1", "noskip")] == "Tiny"
    assert status[("conv1", "skip")] == "Dead"
    assert status[("fc", "noskip")] == status[("fc", "skip")] == "Healthy"
    assert row(table, layer="conv1", variant="skip")["zero_fraction"] == 0.5


def test_summary_json_holds_the_run_ids_layers_and_the_same_rows_as_the_csv(compared):
    store, runs, compare_id = compared
    data = json.loads((artifact_dir(store, compare_id) / "comparison/summary.json").read_text())
    assert data["runs"] == {v: r.run_id for v, r in runs.items()}
    assert data["layers"] == ["conv1", "layer1.0.conv1", "fc"]
    table = read_csv(store, compare_id, "summary.csv")
    as_json = pd.DataFrame(data["summary"])
    assert list(as_json.columns) == list(table.columns)
    for (_, a), (_, b) in zip(as_json.iterrows(), table.iterrows()):
        for col in table.columns:
            if isinstance(b[col], float):
                assert a[col] == pytest.approx(b[col], rel=1e-12, nan_ok=True), col
            else:
                assert a[col] == b[col], col
    assert len(data["per_epoch"]) == len(read_csv(store, compare_id, "per_epoch.csv"))


def test_per_epoch_table_shows_the_skip_run_healthy_in_epoch_one_and_dead_in_epoch_two(compared):
    store, runs, compare_id = compared
    per_epoch = read_csv(store, compare_id, "per_epoch.csv")
    layers = ["conv1", "layer1.0.conv1", "fc"]
    assert len(per_epoch) == 2 * 2 * len(layers)  # variants x epochs x layers
    for variant, run in runs.items():
        for (layer, epoch), want in expected_epochs(run, layers).items():
            got = row(per_epoch, layer=layer, variant=variant, epoch=epoch)
            assert got["median"] == pytest.approx(want["median"], rel=1e-12, abs=0)
            assert got["zero_fraction"] == pytest.approx(want["zero_fraction"])
            assert got["status"] == want["status"], (layer, variant, epoch)
    conv1_skip = per_epoch[(per_epoch.layer == "conv1") & (per_epoch.variant == "skip")]
    assert conv1_skip.sort_values("epoch")["status"].tolist() == ["Healthy", "Dead"]
    l1_skip = per_epoch[(per_epoch.layer == "layer1.0.conv1") & (per_epoch.variant == "skip")]
    assert l1_skip.sort_values("epoch")["status"].tolist() == ["Weak", "Exploding"]


def test_markdown_per_epoch_section_shows_the_collapse(compared):
    store, _, compare_id = compared
    note = store.client.get_run(compare_id).data.tags["mlflow.note.content"]
    section = note[note.index("Per epoch"):]
    header = next(x for x in section.splitlines() if x.startswith("| layer |"))
    assert "epoch 1" in header and "epoch 2" in header
    line = next(x for x in section.splitlines() if x.startswith("| `conv1` | skip |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].endswith("(Healthy)") and cells[3].endswith("(Dead)"), line


def test_note_opens_with_a_diagnosis_naming_each_layer_that_worsened_and_when(compared):
    store, runs, compare_id = compared
    note = store.client.get_run(compare_id).data.tags["mlflow.note.content"]
    head = note[:note.index("| layer |")]
    per_epoch = read_csv(store, compare_id, "per_epoch.csv")
    for (layer, variant), g in per_epoch.groupby(["layer", "variant"]):
        statuses = g.sort_values("epoch")["status"].tolist()
        sentence = f"`{layer}` ({variant}) went from {statuses[0]} in epoch 1 to"
        if statuses[0] == "Healthy" and statuses[1] != "Healthy" or statuses[1] in ("Dead", "Exploding"):
            assert f"{sentence} {statuses[1]} in epoch 2." in head, head
        elif statuses[0] == statuses[1]:
            assert sentence not in head, head
    assert "`conv1` (skip) went from Healthy in epoch 1 to Dead in epoch 2." in head
    assert "`layer1.0.conv1` (skip) went from Weak in epoch 1 to Exploding in epoch 2." in head


def test_status_of_a_layer_does_not_depend_on_which_other_layers_are_compared(mlflow_store):
    # The rule divides by the median of the run's output-side probed layer (fc). Comparing
    # a subset of layers must not change what "Vanishing" means for conv1.
    runs = make_pair(mlflow_store)
    full = read_csv(mlflow_store, compare.compare(), "summary.csv")
    subset = read_csv(mlflow_store, compare.compare(layers=["conv1", "layer1.0.conv1"]),
                      "summary.csv")
    for r in subset.itertuples():
        want = expected_stats(runs[r.variant].histories[r.layer], runs[r.variant].histories["fc"])
        assert r.status == row(full, layer=r.layer, variant=r.variant)["status"] == want["status"], \
            f"{r.layer} {r.variant}: {r.status} with layers=conv1,layer1.0.conv1"


# --- which runs and layers ------------------------------------------------------------------------
def _histories(rng, layers=("conv1", "layer1.0.conv1", "fc"), n=8):
    return {layer: level(rng, 0.1, n) for layer in layers}


def test_default_selection_takes_the_latest_finished_run_of_each_variant(mlflow_store):
    rng = np.random.default_rng(5)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    mk = lambda variant, status="FINISHED": make_training_run(  # noqa: E731
        c, exp, variant, _histories(rng), 4, status=status).run_id
    mk("noskip"), mk("skip")  # older FINISHED
    noskip, skip = mk("noskip"), mk("skip")  # the newest FINISHED of each
    mk("noskip", "FAILED"), mk("skip", "RUNNING"), mk("skip", "KILLED")  # newer, unfinished
    make_plain_run(c, exp, "compare-resnet50")  # not a training run
    tags = c.get_run(compare.compare()).data.tags
    assert (tags["compare.noskip_run"], tags["compare.skip_run"]) == (noskip, skip)


def test_default_selection_takes_the_skip_run_of_the_same_model_as_the_noskip_run(mlflow_store):
    rng = np.random.default_rng(6)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    skip_same = make_training_run(c, exp, "skip", _histories(rng), 4).run_id
    noskip = make_training_run(c, exp, "noskip", _histories(rng), 4).run_id
    make_training_run(c, exp, "skip", _histories(rng), 4, model="resnet18")  # newest skip
    tags = c.get_run(compare.compare()).data.tags
    assert (tags["compare.noskip_run"], tags["compare.skip_run"]) == (noskip, skip_same)


@pytest.mark.parametrize("order", ["noskip,skip", "skip,noskip"])
def test_explicit_run_ids_are_compared_whatever_their_order_and_age(mlflow_store, order):
    rng = np.random.default_rng(7)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    chosen = {v: make_training_run(c, exp, v, _histories(rng), 4).run_id for v in ("noskip", "skip")}
    for v in ("noskip", "skip"):  # newer runs that the default would take
        make_training_run(c, exp, v, _histories(rng), 4)
    ids = [chosen[v] for v in order.split(",")]
    tags = c.get_run(compare.compare(run_ids=ids)).data.tags
    assert (tags["compare.noskip_run"], tags["compare.skip_run"]) == (chosen["noskip"], chosen["skip"])


def test_an_explicit_run_without_gradient_norms_is_refused_by_its_id(mlflow_store):
    rng = np.random.default_rng(7)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    noskip = make_training_run(c, exp, "noskip", _histories(rng), 4).run_id
    other = c.create_run(exp).info.run_id  # a compare run, say: no gradient norms
    with pytest.raises(QueryError) as excinfo:
        compare.compare(run_ids=[other, noskip])
    message = str(excinfo.value)
    assert message.startswith("runs:") and "None" not in message
    assert f"run {other}" in message and "grad_norm/*" in message and noskip not in message


def test_two_runs_of_one_variant_are_compared_labelled_by_their_names(mlflow_store):
    rng = np.random.default_rng(7)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    a = make_training_run(c, exp, "noskip", _histories(rng), 4).run_id
    b = make_training_run(c, exp, "noskip", _histories(rng), 4).run_id
    c.set_tag(a, "mlflow.runName", "first-try")
    c.set_tag(b, "mlflow.runName", "second-try")
    run = c.get_run(compare.compare(run_ids=[a, b]))
    assert run.data.tags[names.COMPARE_LABELS_TAG] == "first-try,second-try"
    assert run.data.tags[names.COMPARE_RUNS_TAG] == f"{a},{b}"
    assert "compare.noskip_run" not in run.data.tags  # not a skip pair
    table = read_csv(mlflow_store, run.info.run_id, "summary.csv")
    assert list(dict.fromkeys(table["variant"])) == ["first-try", "second-try"]
    assert "second_over_first" in table and "skip_over_noskip" not in table


def test_compare_looks_for_runs_in_the_given_experiment(mlflow_store):
    rng = np.random.default_rng(8)
    c = mlflow_store.client
    other = c.create_experiment("gradients")
    in_other = {v: make_training_run(c, other, v, _histories(rng), 4).run_id
                for v in ("noskip", "skip")}
    for v in ("noskip", "skip"):  # newer, in Default
        make_training_run(c, mlflow_store.project_experiment_id(), v, _histories(rng), 4)
    for experiment in ("gradients", other):
        tags = c.get_run(compare.compare(experiment=experiment)).data.tags
        assert tags["compare.noskip_run"] == in_other["noskip"]
        assert tags["compare.skip_run"] == in_other["skip"]


def test_default_layers_are_the_layers_both_runs_share(mlflow_store):
    rng = np.random.default_rng(9)
    c, exp = mlflow_store.client, mlflow_store.project_experiment_id()
    make_training_run(c, exp, "noskip", _histories(rng, ("conv1", "layer1.0.conv1", "fc")), 4)
    make_training_run(c, exp, "skip", _histories(rng, ("conv1", "layer2.0.conv2", "fc")), 4)
    cid = compare.compare()
    assert c.get_run(cid).data.tags["compare.layers"] == "conv1,fc"
    table = read_csv(mlflow_store, cid, "summary.csv")
    assert table["layer"].tolist() == ["conv1", "conv1", "fc", "fc"]


def test_explicit_layers_restrict_the_comparison_to_those_layers(compared):
    store, runs, _ = compared
    cid = compare.compare(layers=["fc", "conv1"])
    assert store.client.get_run(cid).data.tags["compare.layers"] in ("conv1,fc", "fc,conv1")
    table = read_csv(store, cid, "summary.csv")
    assert sorted(set(table["layer"])) == ["conv1", "fc"]
    assert len(table) == 4
    per_epoch = read_csv(store, cid, "per_epoch.csv")
    assert sorted(set(per_epoch["layer"])) == ["conv1", "fc"]
    got = row(table, layer="fc", variant="skip")["median"]
    assert got == pytest.approx(np.median(runs["skip"].histories["fc"]), rel=1e-12)


def test_explicit_layers_that_one_run_lacks_are_refused_before_a_run_is_created(mlflow_store):
    make_pair(mlflow_store)
    before = len(mlflow_store.client.search_runs([mlflow_store.project_experiment_id()]))
    with pytest.raises(QueryError, match="layer4.2.conv3"):
        compare.compare(layers=["conv1", "layer4.2.conv3"])
    assert len(mlflow_store.client.search_runs([mlflow_store.project_experiment_id()])) == before


# --- bad input through the command line -------------------------------------------------------------
def _case_unknown_run(store: Store) -> list[str]:
    runs = make_pair(store)
    return ["--runs", f"{runs['noskip'].run_id},ffffffffffffffffffffffffffffffff"]


def _case_no_grad_norms(store: Store) -> list[str]:
    runs = make_pair(store)
    empty = make_training_run(store.client, store.project_experiment_id(), "skip", {}, 4)
    return ["--runs", f"{runs['noskip'].run_id},{empty.run_id}"]


def _case_no_shared_layers(store: Store) -> list[str]:
    rng = np.random.default_rng(3)
    c, exp = store.client, store.project_experiment_id()
    make_training_run(c, exp, "noskip", {"conv1": level(rng, 1, 6), "layer1.0.conv1": level(rng, 1, 6)}, 3)
    make_training_run(c, exp, "skip", {"layer2.0.conv2": level(rng, 1, 6), "fc": level(rng, 1, 6)}, 3)
    return []  # the default selection finds them


def _case_missing_variant(store: Store) -> list[str]:
    rng = np.random.default_rng(4)
    make_training_run(store.client, store.project_experiment_id(), "noskip",
                      {"conv1": level(rng, 1, 6), "fc": level(rng, 1, 6)}, 3)
    return []


def _case_missing_variant_in_named_experiment(store: Store) -> list[str]:
    rng = np.random.default_rng(4)
    make_pair(store)  # Default has both; the named experiment only a skip run
    exp = store.client.create_experiment("only-skip")
    make_training_run(store.client, exp, "skip", {"conv1": level(rng, 1, 6), "fc": level(rng, 1, 6)}, 3)
    return ["--experiment", "only-skip"]


def _case_layer_not_in_both(store: Store) -> list[str]:
    make_pair(store)
    return ["--layers", "conv1,layer4.2.conv3"]


BAD_INPUT = {
    "unknown run ID": (_case_unknown_run, "ffffffffffffffffffffffffffffffff"),
    "run without grad_norm metrics": (_case_no_grad_norms, "grad_norm"),
    "runs sharing no layer": (_case_no_shared_layers, "share no"),
    "experiment lacking the skip variant": (_case_missing_variant, "skip"),
    "named experiment lacking the noskip variant": (_case_missing_variant_in_named_experiment,
                                                    "noskip"),
    "a layer not probed in both runs": (_case_layer_not_in_both, "layer4.2.conv3"),
}


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Each case in its own store; the `python -m pipeline compare` processes run together
    (each spends seconds importing), then every test checks its own."""
    cases = {}
    for name, (build, _) in BAD_INPUT.items():
        directory = tmp_path_factory.mktemp("bad_input")
        with pytest.MonkeyPatch.context() as mp:
            store = new_store(directory, mp, tmp_path_factory)
            try:
                args = build(store)
                before = {r.info.run_id for r in store.client.search_runs(
                    [e.experiment_id for e in store.client.search_experiments()])}
            finally:
                deactivate_store()
        cases[name] = (store, args, before)
    procs = {name: subprocess.Popen([sys.executable, "-m", "pipeline", "compare", *args],
                                    cwd=store.dir, env=subprocess_env(store), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (store, args, _) in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                         *cases[name])
    return results


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_compare_cli_refuses_bad_input_with_one_error_line_and_exit_code_2(bad_input_results, case):
    proc, store, args, before = bad_input_results[case]
    assert proc.returncode == 2, describe(proc)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    assert BAD_INPUT[case][1] in lines[0], describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr
    after = store.client.search_runs([e.experiment_id for e in store.client.search_experiments()])
    assert {r.info.run_id for r in after} == before, "a refused compare must not leave a run"


# --- real training runs -----------------------------------------------------------------------------
def test_compare_of_real_training_runs_agrees_with_their_metric_histories_and_json(
        trained_pair, tmp_path, monkeypatch, tmp_path_factory):
    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=trained_pair.dir)
    try:
        cid = compare.compare()
        client = store.client
        tags = client.get_run(cid).data.tags
        assert tags["compare.noskip_run"] == trained_pair.noskip
        assert tags["compare.skip_run"] == trained_pair.skip
        table = read_csv(store, cid, "summary.csv")
        per_epoch = read_csv(store, cid, "per_epoch.csv")
        for variant, run_id in (("noskip", trained_pair.noskip), ("skip", trained_pair.skip)):
            run = client.get_run(run_id)
            layers = run.data.tags["layers.resolved"].split(",")  # the param is `auto`
            spe = int(run.data.tags["steps_per_epoch"])
            hist = {layer: np.array([p.value for p in sorted(
                client.get_metric_history(run_id, f"grad_norm/{layer}"), key=lambda p: p.step)])
                for layer in layers}
            # the training run's JSON artifact says the same as its metrics
            with open(client.download_artifacts(run_id, "gradients/gradients.json", str(tmp_path / variant))) as f:
                assert {k: list(v) for k, v in json.load(f).items()} == {
                    k: v.tolist() for k, v in hist.items()}
            for layer in layers:
                got = row(table, layer=layer, variant=variant)
                want = expected_stats(hist[layer], hist[layers[-1]])
                for key, value in want.items():
                    if isinstance(value, str):
                        assert got[key] == value, (layer, variant, key)
                    else:
                        assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (layer, key)
                for key in FINALS:
                    assert got[key] == pytest.approx(run.data.metrics[key], rel=1e-12)
                n = len(hist[layer])
                epochs = sorted(per_epoch.loc[(per_epoch.layer == layer)
                                              & (per_epoch.variant == variant), "epoch"])
                assert epochs == list(range(-(-n // spe)))
    finally:
        deactivate_store()


@pytest.mark.slow
def test_mlflow_run_compare_entry_point_leaves_a_finished_compare_run(mlflow_store):
    runs = make_pair(mlflow_store)
    exp = mlflow_store.project_experiment_id()
    before = {r.info.run_id for r in mlflow_store.client.search_runs([exp])}
    proc = run_mlflow(mlflow_store, "compare")
    assert proc.returncode == 0, describe(proc)
    new = [r for r in mlflow_store.client.search_runs([exp]) if r.info.run_id not in before]
    assert len(new) == 1, describe(proc)
    run = new[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["compare.noskip_run"] == runs["noskip"].run_id
    assert run.data.tags["compare.skip_run"] == runs["skip"].run_id
    assert run.data.params == {"experiment": "auto", "runs": "latest", "layers": "shared",
                               "quantity": "auto", "label": "auto"}
    assert {f.path for f in mlflow_store.client.list_artifacts(run.info.run_id, "comparison")} \
        == set(ARTIFACTS)
