"""End to end: real `mlflow run` and `python -m pipeline train` into a temporary store,
then everything read back through MLflow's own client."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, names
from pipeline.config import Config

from conftest import (REPO_ROOT, describe_process, make_image_folder, run_mlflow_project,
                      run_pipeline)

pytestmark = pytest.mark.slow

STEPS = 20
# The smoke command, with small synthetic splits and in-process data loading (on
# 2 busy cores, worker processes can triple its time); the image-folder test below runs
# a loader worker process.
SMOKE = {"dataset": "synthetic", "image_size": "32", "max_steps": str(STEPS),
         "synthetic_size": "64", "synthetic_test_size": "32", "num_workers": "0"}
EPOCH_METRICS = (names.TRAIN_ACCURACY, names.TEST_ACCURACY, names.TEST_LOSS,
                 names.EPOCH_SECONDS, names.IMAGES_PER_SECOND)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def only_run(client: MlflowClient):
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def history(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def assert_one_finite_positive_point_per_step(client, run_id, key, steps):
    points = history(client, run_id, key)
    assert [m.step for m in points] == list(range(steps)), key
    values = [m.value for m in points]
    assert all(math.isfinite(v) and v > 0 for v in values), (key, values)
    return values


def download(client, run_id, path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


# --- `mlflow run .` with the README's smoke parameters: one run, many checks -------------------
@pytest.fixture(scope="module")
def smoke_run(module_tracking_store):
    store = module_tracking_store
    repo_had_db = (REPO_ROOT / "mlflow.db").exists()
    proc = run_mlflow_project(SMOKE, cwd=store.dir, store=store)
    assert proc.returncode == 0, describe_process(proc)
    assert repo_had_db or not (REPO_ROOT / "mlflow.db").exists(), "the run wrote into the repo"
    client = MlflowClient(tracking_uri=store.uri)
    return client, only_run(client), store


def test_mlflow_run_ends_in_exactly_one_finished_run_named_after_the_variant(smoke_run):
    client, run, _ = smoke_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resnet50-noskip"
    assert run.data.tags[names.VARIANT_TAG] == "noskip"
    assert run.data.tags[names.MODEL_TAG] == "resnet50"
    note = run.data.tags.get(names.NOTE_TAG, "")
    assert "resnet50" in note and "without skip" in note
    assert "error" not in run.data.tags


def test_mlflow_run_logs_every_parameter_once_as_the_given_strings(smoke_run):
    _, run, _ = smoke_run
    # Every parameter as given, plus world_size (derived: nproc_per_node x nnodes).
    assert run.data.params == {**Config.from_strings(SMOKE).to_params(), names.WORLD_SIZE_PARAM: "1"}


def test_every_probed_layer_has_one_finite_positive_norm_per_step_0_to_19(smoke_run):
    client, run, _ = smoke_run
    keys = [k for k in run.data.metrics if k.startswith(names.GRAD_NORM_PREFIX)]
    assert sorted(keys) == sorted(names.grad_norm(layer) for layer in config.DEFAULT_LAYERS)
    for key in keys:
        assert_one_finite_positive_point_per_step(client, run.info.run_id, key, STEPS)


def test_train_loss_is_logged_at_every_step(smoke_run):
    client, run, _ = smoke_run
    losses = assert_one_finite_positive_point_per_step(client, run.info.run_id, names.TRAIN_LOSS, STEPS)
    assert all(v < 10 for v in losses)  # about ln(10) for an untrained 10-way classifier


def test_epoch_metrics_are_logged_once_per_epoch(smoke_run):
    client, run, _ = smoke_run
    steps_per_epoch = math.ceil(int(SMOKE["synthetic_size"]) / Config().batch_size)
    epochs = math.ceil(STEPS / steps_per_epoch)
    assert run.data.tags["steps_per_epoch"] == str(steps_per_epoch)
    for key in EPOCH_METRICS:
        points = history(client, run.info.run_id, key)
        assert [m.step for m in points] == list(range(epochs)), key
        assert all(math.isfinite(m.value) and m.value >= 0 for m in points), key
    for key in (names.TRAIN_ACCURACY, names.TEST_ACCURACY):
        assert all(0 <= m.value <= 1 for m in history(client, run.info.run_id, key))
    assert all(m.value > 0 for m in history(client, run.info.run_id, names.IMAGES_PER_SECOND))


def test_gradients_json_artifact_equals_the_metric_histories(smoke_run, tmp_path):
    client, run, _ = smoke_run
    path = download(client, run.info.run_id, names.GRADIENTS_JSON, tmp_path)
    gradients = json.loads(path.read_text())
    assert list(gradients) == list(config.DEFAULT_LAYERS)
    for layer, values in gradients.items():
        logged = [m.value for m in history(client, run.info.run_id, names.grad_norm(layer))]
        assert values == logged, layer  # the same floats, in step order


def test_gradient_plot_artifact_is_a_png(smoke_run, tmp_path):
    client, run, _ = smoke_run
    path = download(client, run.info.run_id, names.GRADIENT_PLOT, tmp_path)
    blob = path.read_bytes()
    assert blob.startswith(PNG_MAGIC)
    from PIL import Image
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 200 and image.size[1] > 100


def test_mlflow_run_refusing_a_bad_value_leaves_one_failed_run_with_an_error_tag(tracking_store):
    proc = run_mlflow_project({"skip": "maybe"}, cwd=tracking_store.dir, store=tracking_store,
                              timeout=120)
    assert proc.returncode != 0
    assert "error: skip: " in proc.stderr, describe_process(proc)
    assert "Traceback (most recent call last)" not in proc.stderr.split("error: skip")[0]
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert "skip" in run.data.tags.get("error", "")


def test_mlflow_run_with_skip_entry_point_trains_the_skip_variant_and_logs_skip(tracking_store):
    # with_skip does not declare `skip` (its command fixes --skip true), so `mlflow run`
    # logs every parameter but that one; the pipeline must add it.
    params = {"dataset": "synthetic", "image_size": "32", "max_steps": "2",
              "synthetic_size": "16", "synthetic_test_size": "8", "batch_size": "8",
              "num_workers": "0"}
    proc = run_mlflow_project(params, cwd=tracking_store.dir, store=tracking_store,
                              entry_point="with_skip")
    assert proc.returncode == 0, describe_process(proc)
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resnet50-skip"
    assert run.data.tags[names.VARIANT_TAG] == "skip"
    assert run.data.params == {**Config.from_strings(dict(params, skip="true")).to_params(),
                               names.WORLD_SIZE_PARAM: "1"}
    for layer in config.DEFAULT_LAYERS:
        assert_one_finite_positive_point_per_step(client, run.info.run_id, names.grad_norm(layer), 2)


# --- `python -m pipeline train`: the with_skip variant and an image folder ---------------------
def test_python_m_pipeline_with_skip_true_logs_a_skip_run_with_every_param(tracking_store):
    steps = 6
    args = {"skip": "true", "dataset": "synthetic", "image_size": "32", "max_steps": str(steps),
            "synthetic_size": "24", "synthetic_test_size": "8", "batch_size": "8",
            "num_workers": "0", "flush_every": "4"}
    cli = ["train"] + [a for k, v in args.items() for a in (f"--{k.replace('_', '-')}", v)]
    proc = run_pipeline(cli, cwd=tracking_store.dir, store=tracking_store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)

    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_id in proc.stdout  # the user is told which run it was
    assert run.info.run_name == "resnet50-skip"
    assert run.data.tags[names.VARIANT_TAG] == "skip"
    assert set(run.data.params) == {f.name for f in config.fields()} | {names.WORLD_SIZE_PARAM}
    assert run.data.params == {**Config.from_strings(args).to_params(), names.WORLD_SIZE_PARAM: "1"}
    for layer in config.DEFAULT_LAYERS:  # flush_every 4 over 6 steps: a full and a partial chunk
        assert_one_finite_positive_point_per_step(client, run.info.run_id,
                                                  names.grad_norm(layer), steps)
    assert (tracking_store.dir / "mlruns").is_dir()  # artifacts landed in the cwd's store


def test_python_m_pipeline_trains_on_an_image_folder_with_a_loader_worker(tracking_store):
    folder = tracking_store.dir / "images"
    make_image_folder(folder, per_class={"train": 2, "test": 1}, size=(32, 32))
    steps = 3
    proc = run_pipeline(["train", "--dataset", "imagefolder", "--data-dir", str(folder),
                         "--image-size", "32", "--batch-size", "4", "--max-steps", str(steps),
                         "--num-workers", "1", "--layers", "conv1,fc"],
                        cwd=tracking_store.dir, store=tracking_store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "imagefolder"
    assert run.data.params["data_dir"] == str(folder)
    assert run.data.tags["steps_per_epoch"] == "5"  # 20 images, batches of 4
    for layer in ("conv1", "fc"):
        assert_one_finite_positive_point_per_step(client, run.info.run_id,
                                                  names.grad_norm(layer), steps)
    assert [m.step for m in history(client, run.info.run_id, names.TEST_ACCURACY)] == [0]
    gradients = json.loads(download(client, run.info.run_id, names.GRADIENTS_JSON,
                                    tracking_store.dir / "dl").read_text())
    assert list(gradients) == ["conv1", "fc"] and all(len(v) == steps for v in gradients.values())
    assert "ImageFolder" in run.data.tags[names.NOTE_TAG]
