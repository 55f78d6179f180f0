"""The `all` step: train both variants (reusing FINISHED runs), then compare them.

One real `python -m pipeline all` on tiny synthetic data builds a store once per module;
tests that run `all` again work on their own copy of that store (workflow.run_all
in-process), so each starts from the same state: two training runs, a compare run and
their parent.
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline import code_version, names, query, workflow
from pipeline.config import Config
from runs_helpers import (TINY_TRAIN, Store, deactivate_store, describe, new_store,
                          run_pipeline)

pytestmark = pytest.mark.slow

# Each field differs from Config's default, so a dropped option would show as a default.
# data_path=device on the CPU: the variants share one prepared copy of the data.
TINY = dict(TINY_TRAIN, max_steps=6, seed=3, lr=0.002, synthetic_size=24, data_path="device")
CFG = Config(**TINY)
STEPS_PER_EPOCH = math.ceil(CFG.synthetic_size / CFG.batch_size)  # 3
STEPS = min(CFG.max_steps, CFG.epochs * STEPS_PER_EPOCH)           # 6


def _cli_args(cfg: Config) -> list[str]:
    args = []
    for name, value in cfg.to_params().items():
        if name != "skip":
            args += [f"--{name.replace('_', '-')}", value]
    return args


def _runs(store: Store) -> dict[str, object]:
    client = store.client
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r for r in client.search_runs(exps, max_results=1000)}


def _training(runs: dict) -> set[str]:
    return {i for i, r in runs.items() if "variant" in r.data.tags}


@dataclasses.dataclass
class FirstAll:
    store: Store
    parent: object
    runs: dict
    proc: object = None  # the `python -m pipeline all` process: its stdout is the answer


@pytest.fixture(scope="module")
def first_all(tmp_path_factory) -> FirstAll:
    directory = tmp_path_factory.mktemp("all_store")
    with pytest.MonkeyPatch.context() as mp:
        store = new_store(directory, mp, tmp_path_factory)
        deactivate_store()
    proc = run_pipeline(store, "all", "--force", "false", *_cli_args(CFG), timeout=400)
    assert proc.returncode == 0, describe(proc)
    runs = _runs(store)
    parents = [r for r in runs.values() if r.data.tags.get("pipeline.step") == "all"]
    assert len(parents) == 1, describe(proc)
    return FirstAll(store, parents[0], runs, proc)


@pytest.fixture
def again(first_all, tmp_path, monkeypatch, tmp_path_factory):
    """This test's own copy of the store after the first `all`, active in this process."""
    store = new_store(tmp_path, monkeypatch, tmp_path_factory, source=first_all.store.dir)
    yield store
    deactivate_store()


def test_all_creates_a_parent_run_with_two_training_children_and_a_compare_child(first_all):
    parent, runs = first_all.parent, first_all.runs
    pid, tags = parent.info.run_id, parent.data.tags
    assert parent.info.status == "FINISHED"
    assert len(runs) == 4
    children = {i: r for i, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == pid}
    assert set(children) == {tags["all.noskip_run"], tags["all.skip_run"], tags["all.compare_run"]}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert runs[tags["all.noskip_run"]].data.tags["variant"] == "noskip"
    assert runs[tags["all.skip_run"]].data.tags["variant"] == "skip"
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "false"
    compare_tags = runs[tags["all.compare_run"]].data.tags
    assert compare_tags["compare.noskip_run"] == tags["all.noskip_run"]
    assert compare_tags["compare.skip_run"] == tags["all.skip_run"]
    assert {f.path for f in first_all.store.client.list_artifacts(tags["all.compare_run"],
                                                                 "comparison")} >= {
        "comparison/summary.md", "comparison/gradient_norms.png"}


def test_all_says_which_run_is_which_and_ends_with_the_diagnosis_and_how_to_open_it(first_all):
    tags, proc = first_all.parent.data.tags, first_all.proc
    runs = first_all.runs
    noskip, skip, compare_id = tags["all.noskip_run"], tags["all.skip_run"], tags["all.compare_run"]
    out = proc.stdout
    assert (f"compare: noskip = {runs[noskip].info.run_name} ({noskip}), "
            f"skip = {runs[skip].info.run_name} ({skip})") in out, describe(proc)
    after = out.split("compare: noskip =")[1]
    assert "- Input-side layer conv1:" in after, describe(proc)
    assert "noskip median" in after and "skip median" in after, describe(proc)
    assert f"/runs/{compare_id}?workflowType=machine_learning" in after, describe(proc)
    assert "\x1b[" not in out, describe(proc)  # a pipe: no colour codes
    for run_id in (noskip, skip, compare_id):  # every run has its one-page report
        listed = {a.path for a in first_all.store.client.list_artifacts(run_id)}
        assert names.REPORT_HTML in listed, run_id


def test_the_all_run_carries_the_comparisons_summary_metrics(first_all):
    compare_id = first_all.parent.data.tags["all.compare_run"]
    answer = {k: v for k, v in first_all.runs[compare_id].data.metrics.items()
              if k.startswith("compare/")}
    assert answer and {k: first_all.parent.data.metrics[k] for k in answer} == answer


def test_all_prepares_the_device_data_once_for_both_variants(first_all):
    tags, runs = first_all.parent.data.tags, first_all.runs
    noskip, skip = runs[tags["all.noskip_run"]], runs[tags["all.skip_run"]]
    assert noskip.data.tags[names.DATA_PATH_TAG] == skip.data.tags[names.DATA_PATH_TAG] == "device"
    assert noskip.data.tags[names.DATA_REUSED_TAG] == "false"
    assert skip.data.tags[names.DATA_REUSED_TAG] == "true"
    # Same data: the datasets' digests logged by both runs agree.
    digests = [sorted(d.dataset.digest for d in r.inputs.dataset_inputs) for r in (noskip, skip)]
    assert digests[0] == digests[1] and len(digests[0]) == 2


def test_all_passes_training_params_through_to_both_variants(first_all):
    tags, runs, client = first_all.parent.data.tags, first_all.runs, first_all.store.client
    for variant in ("noskip", "skip"):
        run = runs[tags[f"all.{variant}_run"]]
        # world_size is derived (nproc_per_node x nnodes), logged beside the parameters.
        params = dict(run.data.params)
        assert params.pop(names.WORLD_SIZE_PARAM) == "1"
        assert Config.from_strings(params) == dataclasses.replace(
            CFG, skip=variant == "skip"), variant
        assert run.data.params["max_steps"] == "6" and run.data.params["image_size"] == "32"
        # ... and the training obeyed them: synthetic_size / batch_size batches per epoch,
        # stopped after max_steps
        assert run.data.tags["steps_per_epoch"] == str(STEPS_PER_EPOCH)
        history = client.get_metric_history(run.info.run_id, "grad_norm/conv1")
        assert sorted(p.step for p in history) == list(range(STEPS))
    assert first_all.parent.data.params["force"] == "false"


def test_running_all_again_reuses_both_finished_training_runs(first_all, again):
    before = _runs(again)
    parent_id = workflow.run_all(CFG, force=False)
    after = _runs(again)
    new = set(after) - set(before)
    tags = after[parent_id].data.tags
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "true"
    old = first_all.parent.data.tags
    assert (tags["all.noskip_run"], tags["all.skip_run"]) == (old["all.noskip_run"],
                                                              old["all.skip_run"])
    assert new == {parent_id, tags["all.compare_run"]}  # a new parent and compare, no training
    assert _training(after) == _training(before)
    assert after[tags["all.compare_run"]].data.tags["mlflow.parentRunId"] == parent_id
    assert after[parent_id].info.status == "FINISHED"


def test_force_retrains_both_variants(again):
    before = _runs(again)
    parent_id = workflow.run_all(CFG, force=True)
    after = _runs(again)
    tags = after[parent_id].data.tags
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "false"
    fresh = _training(after) - _training(before)
    assert fresh == {tags["all.noskip_run"], tags["all.skip_run"]}
    for run_id in fresh:
        assert after[run_id].data.tags["mlflow.parentRunId"] == parent_id
        assert after[run_id].info.status == "FINISHED"
    assert after[parent_id].data.params["force"] == "true"


def test_a_changed_training_parameter_retrains_both_variants(again):
    before = _runs(again)
    cfg = dataclasses.replace(CFG, seed=CFG.seed + 1)
    parent_id = workflow.run_all(cfg, force=False)
    after = _runs(again)
    tags = after[parent_id].data.tags
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "false"
    fresh = _training(after) - _training(before)
    assert fresh == {tags["all.noskip_run"], tags["all.skip_run"]}
    assert {after[i].data.params["seed"] for i in fresh} == {str(cfg.seed)}


def test_only_a_finished_run_with_the_same_code_version_is_reused(first_all, again):
    # noskip: its code_version tag says an older source; skip: it ended FAILED.
    old = first_all.parent.data.tags
    again.client.set_tag(old["all.noskip_run"], "code_version", "0000000000000000")
    again.client.set_terminated(old["all.skip_run"], "FAILED")
    assert code_version() != "0000000000000000"
    before = _runs(again)
    parent_id = workflow.run_all(CFG, force=False)
    after = _runs(again)
    tags = after[parent_id].data.tags
    assert tags["all.noskip_reused"] == tags["all.skip_reused"] == "false"
    assert _training(after) - _training(before) == {tags["all.noskip_run"], tags["all.skip_run"]}
    # and the newly trained pair is what the next `all` reuses
    again_id = workflow.run_all(CFG, force=False)
    tags2 = _runs(again)[again_id].data.tags
    assert tags2["all.noskip_reused"] == tags2["all.skip_reused"] == "true"
    assert (tags2["all.noskip_run"], tags2["all.skip_run"]) == (tags["all.noskip_run"],
                                                                tags["all.skip_run"])
    assert query.find_runs(status="FINISHED", skip=True)["run_id"].iloc[0] == tags["all.skip_run"]
