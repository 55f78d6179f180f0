"""Long runs survive crashes, signals and NaNs, and lose nothing (issue 5, parts 1, 2, 4, 5).

Every test drives a real ``python -m pipeline train`` process against a real ``mlflow
server`` (SQLite behind it) that the test starts on 127.0.0.1:
it is killed with SIGKILL and resumed, or sent SIGINT/SIGTERM, or driven into NaNs with an
absurd learning rate. Sizes are tiny (32 px, batches of 4) so each run takes seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint, names

from conftest import (describe_process, run_mlflow_project, run_pipeline, subprocess_env,
                      the_error_line)
from pipeline.config import DEFAULT_EXPERIMENT
from runs_helpers import RUN_VARS, Store
from test_outage import MlflowServer

# 40 images in batches of 4: 10 steps per epoch; 2 epochs = 20 steps.
TINY = ["--dataset", "synthetic", "--image-size", "32", "--synthetic-size", "40",
        "--synthetic-test-size", "8", "--batch-size", "4", "--num-workers", "0",
        "--device", "cpu", "--flush-every", "2", "--log-model", "false"]
# Where only the process's behaviour matters (signals, locks), the smallest ResNet; the
# bit-for-bit resume keeps the README's network (resnet50) and its ~0.2 s steps, which put
# the kill inside epoch 1.
SMALL_NET = ["--model", "resnet18"]
EXACT_KEYS = [names.TRAIN_LOSS, names.TRAIN_ACCURACY, names.TEST_ACCURACY, names.TEST_LOSS,
              "grad_norm/conv1", "grad_norm/layer1.0.conv1", "grad_norm/fc"]


def server_store(tmp_path, monkeypatch):
    """A real `mlflow server` for this test; training processes run in ``tmp_path`` (their
    checkpoints land in ``tmp_path/checkpoints``) with MLFLOW_TRACKING_URI pointing at it."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for var in RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        yield Store(tmp_path, server.url)
    finally:
        server.kill()


# This module's tests all run against a server (tests/test_distributed_runs.py imports it too).
tracking_store = pytest.fixture(server_store, name="tracking_store")


def all_runs(client: MlflowClient):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def start_training(store, *args) -> subprocess.Popen:
    # Its own process group, as a shell job has: a signal can go to it and its loader workers.
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", *TINY, *args],
                            cwd=store.dir, env=subprocess_env(store), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_for_steps(store, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> str:
    """Poll the store until the running run has ``at_least`` train/loss points; its ID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early:\n{proc.communicate()[1][-3000:]}"
        runs = [r for r in all_runs(store.client) if r.info.status == "RUNNING"]
        if runs and len(store.client.get_metric_history(runs[0].info.run_id,
                                                         names.TRAIN_LOSS)) >= at_least:
            return runs[0].info.run_id
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {at_least} steps within {timeout} s")


def final_weights(store, run_id: str) -> dict[str, torch.Tensor]:
    """The weights of a FINISHED run that logged its checkpoint (its local one is deleted)."""
    path = store.client.download_artifacts(run_id, names.CHECKPOINT_ARTIFACT,
                                           str(store.dir / "downloaded" / run_id))
    return torch.load(path, weights_only=False)["model"]


# --- 1. checkpoints and resume -----------------------------------------------------------
@pytest.mark.slow
# The resume names only the run, through each documented command: `python -m pipeline train
# --resume ID`, and the README's `mlflow run . -P resume=ID`, which passes every parameter's
# launch default (skip=false, resnet50, 224 px, cifar10...): with skip=true it must rebuild
# the run's own network and data, or the numbers would not be the uninterrupted run's.
@pytest.mark.parametrize("network, command", [([], "python"), (["--skip", "true"], "mlflow run")],
                         ids=["noskip-python-m-pipeline", "skip-mlflow-run"])
def test_a_run_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run_bit_for_bit(
        tracking_store, network, command):
    store = tracking_store
    plan = ["--epochs", "2", "--checkpoint-every", "3", "--log-checkpoint", "true", *network]
    proc = run_pipeline(["train", *TINY, *plan], cwd=store.dir, store=store, timeout=300)
    assert proc.returncode == 0, describe_process(proc)
    (reference,) = all_runs(store.client)

    victim = start_training(store, *plan)
    run_id = wait_for_steps(store, victim, at_least=8)  # inside epoch 1 (steps 0..9)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert store.client.get_run(run_id).info.status == "RUNNING"  # nobody ended it

    if command == "python":
        proc = run_pipeline(["train", "--resume", run_id, "--device", "cpu"], cwd=store.dir,
                            store=store, timeout=300)
    else:  # `mlflow run` runs the entry point in the project folder: the checkpoint_dir
        # the victim used is named, as the printed resume command names a non-default one.
        proc = run_mlflow_project({"resume": run_id,
                                   "checkpoint_dir": str(store.dir / "checkpoints")},
                                  cwd=store.dir, store=store, timeout=300,
                                  MLFLOW_EXPERIMENT_NAME=DEFAULT_EXPERIMENT)
    assert proc.returncode == 0, describe_process(proc)
    resumed = store.client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert int(resumed.data.tags[names.RESUMED_AT_TAG]) in (6, 9)  # a checkpoint every 3
    assert resumed.data.tags[names.VARIANT_TAG] == reference.data.tags[names.VARIANT_TAG]
    runs = all_runs(store.client)
    if command == "python":
        assert len(runs) == 2  # the same run went on; no new one
    else:  # and the run `mlflow run` opened for the launch says where the training went
        (launch,) = [r for r in runs if r.info.run_id not in (run_id, reference.info.run_id)]
        assert launch.data.tags[names.RESUMED_INTO_TAG] == run_id
        assert launch.data.params["skip"] == "false"  # the launch's default, not the run's
        assert not [k for k in launch.data.metrics if k.startswith("grad_norm/")]
    for key in EXACT_KEYS:
        got, want = history(store.client, run_id, key), history(store.client, reference.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: steps missing or repeated"
        assert got == want, key
    a, b = final_weights(store, run_id), final_weights(store, reference.info.run_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # FINISHED now: the resume's checkpoint served its purpose, and goes with its tag.
    assert not checkpoint.path_for(store.dir / "checkpoints", run_id).parent.exists()
    assert names.CHECKPOINT_TAG not in resumed.data.tags


def test_resume_of_an_unknown_run_is_one_line_naming_resume_before_any_data_work(tracking_store):
    proc = run_pipeline(["train", "--resume", "0123456789abcdef0123456789abcdef", "--dataset",
                         "cifar10", "--data-dir", "nowhere"], cwd=tracking_store.dir,
                        store=tracking_store)
    assert proc.returncode == 2, describe_process(proc)
    the_error_line(proc, "error: resume:")
    assert not (tracking_store.dir / "nowhere").exists()


@pytest.mark.slow
def test_a_finished_run_deletes_its_local_checkpoint_folder_and_tag_but_keeps_the_artifact(
        tracking_store):
    proc = run_pipeline(["train", *TINY, "--model", "resnet18", "--max-steps", "2",
                         "--checkpoint-dir", "ckpt", "--log-checkpoint", "true"],
                        cwd=tracking_store.dir, store=tracking_store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)
    (run,) = all_runs(tracking_store.client)
    assert run.info.status == "FINISHED"
    assert (tracking_store.dir / "ckpt").is_dir()  # it was written...
    assert not checkpoint.path_for(tracking_store.dir / "ckpt", run.info.run_id).parent.exists()
    assert names.CHECKPOINT_TAG not in run.data.tags  # ...and no tag points at it any more
    logged = tracking_store.client.download_artifacts(
        run.info.run_id, names.CHECKPOINT_ARTIFACT, str(tracking_store.dir / "logged"))
    assert torch.load(logged, weights_only=False)["position"]["step"] == 2


def test_a_runs_claim_is_refused_while_its_holder_lives_and_free_once_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline import checkpoint; "
         "held = checkpoint.Claim(sys.argv[1], 'r1'); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(checkpoint.Busy) as busy:
            checkpoint.Claim(tmp_path, "r1")
        assert busy.value.pid == str(holder.pid)
        checkpoint.Claim(tmp_path, "r2").release()  # another run is free
    finally:
        holder.kill()  # kill -9: the kernel lets go of the lock, no clean-up code runs
        holder.wait(timeout=30)
    mine = checkpoint.Claim(tmp_path, "r1")
    with pytest.raises(checkpoint.Busy):  # one holder at a time, in this process too
        checkpoint.Claim(tmp_path, "r1")
    mine.release()
    checkpoint.Claim(tmp_path, "r1").release()


@pytest.mark.slow
def test_resuming_a_run_its_process_still_trains_is_refused_in_one_line_and_leaves_it_alone(
        tracking_store):
    store, client = tracking_store, tracking_store.client
    victim = start_training(store, "--epochs", "50", *SMALL_NET)
    try:
        run_id = wait_for_steps(store, victim, at_least=2)
        proc = run_pipeline(["train", "--resume", run_id, "--device", "cpu"], cwd=store.dir,
                            store=store, timeout=180)
        assert proc.returncode == 2, describe_process(proc)
        error = the_error_line(proc, "error: resume:")
        assert f"still being trained by process {victim.pid}" in error
        trained = len(history(client, run_id, names.TRAIN_LOSS))
        wait_for_steps(store, victim, at_least=trained + 2)  # it goes on, untouched
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and names.RESUMED_AT_TAG not in run.data.tags
        victim.send_signal(signal.SIGTERM)
        _, err = victim.communicate(timeout=60)
        assert victim.returncode == 143, err[-3000:]
    finally:
        if victim.poll() is None:
            victim.kill()
    checkpoint.Claim(store.dir / "checkpoints", run_id).release()  # free once it has exited


def test_the_printed_resume_command_names_the_checkpoint_dir_unless_it_is_the_default():
    from pipeline import resume
    from pipeline.config import Config

    assert resume.resume_args(Config(), "abc") == "-P resume=abc"
    assert (resume.resume_args(Config(checkpoint_dir="/data/ck"), "abc")
            == "-P resume=abc -P checkpoint_dir=/data/ck")


def test_resume_of_a_finished_run_is_refused_in_one_line_and_leaves_the_run_as_it_was(
        tracking_store):
    proc = run_pipeline(["train", *TINY, "--model", "resnet18", "--max-steps", "2"],
                        cwd=tracking_store.dir, store=tracking_store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)
    (run,) = all_runs(tracking_store.client)
    run_id, client = run.info.run_id, tracking_store.client
    before = {"metrics": run.data.metrics, "tags": run.data.tags,
              "norms": client.download_artifacts(run_id, "gradients/norms.npz",
                                                 str(tracking_store.dir / "before"))}
    proc = run_pipeline(["train", "--resume", run_id, "--dataset", "cifar10", "--data-dir",
                         "nowhere"], cwd=tracking_store.dir, store=tracking_store)
    assert proc.returncode == 2
    error = the_error_line(proc, "error: resume:")
    assert "FINISHED" in error and "allowed:" in error
    assert not (tracking_store.dir / "nowhere").exists()
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED"
    assert after.data.metrics == before["metrics"] and after.data.tags == before["tags"]
    again = client.download_artifacts(run_id, "gradients/norms.npz", str(tracking_store.dir / "after"))
    assert Path(again).read_bytes() == Path(before["norms"]).read_bytes()


# --- 2. interruption ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig, code, workers", [
    (signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 0),
    # To the whole process group, loader workers included, as `timeout`, Ctrl-C in a
    # terminal or a scheduler's preemption send it: the workers must not fail the run.
    (signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 2)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-to-the-group-with-workers", "SIGINT-to-the-group-with-workers"])
def test_a_signal_finishes_the_step_flushes_checkpoints_and_ends_the_run_killed(
        tracking_store, sig, code, workers):
    store = tracking_store
    proc = start_training(store, "--epochs", "5", "--num-workers", str(workers), *SMALL_NET)
    run_id = wait_for_steps(store, proc, at_least=4)
    sent = time.monotonic()
    if workers:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    assert time.monotonic() - sent < 20  # "within a few seconds" (a step is ~0.05 s here)
    run = store.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert signal.Signals(sig).name in run.data.tags[names.ERROR_TAG]
    steps = [s for s, _ in history(store.client, run_id, names.TRAIN_LOSS)]
    assert steps == list(range(len(steps)))  # flushed: every step done, once, in order
    state = torch.load(checkpoint.path_for(store.dir / "checkpoints", run_id), weights_only=False)
    assert state["position"]["step"] == len(steps)  # the checkpoint is after the last step
    assert f"-P resume={run_id}" in err


@pytest.mark.slow
@pytest.mark.parametrize("after", [1.5, 3.0])
def test_a_sigterm_at_any_moment_ends_the_run_mlflow_run_opened_killed_never_running(
        tracking_store, after):
    # `mlflow run` opens the run before our process starts. A SIGTERM while the process
    # imports, prepares the data or trains (wherever `after` seconds land) must end that run
    # KILLED: Python's default for SIGTERM would end the process and leave it RUNNING.
    store = tracking_store
    run_id = store.client.create_run(store.client.create_experiment("sigterm")).info.run_id
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *TINY, "--epochs", "50",
         "--num-workers", "2", *SMALL_NET],
        cwd=store.dir, env=subprocess_env(store, MLFLOW_RUN_ID=run_id,
                                          MLFLOW_EXPERIMENT_NAME="sigterm"),
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    run = store.client.get_run(run_id)
    assert run.info.status == "KILLED", err[-3000:]
    assert "SIGTERM" in run.data.tags[names.ERROR_TAG]


# --- 4. numerical faults ---------------------------------------------------------------------
# SGD at lr 1e8 overflows within two steps on these images: a real NaN, not an injected one.
EXPLODE = ["--optimizer", "sgd", "--lr", "1e8", "--skip", "true", "--epochs", "2"]


@pytest.mark.slow
def test_on_nan_stop_records_the_nan_keeps_a_checkpoint_from_before_and_fails_the_run(tracking_store):
    store = tracking_store
    proc = run_pipeline(["train", *TINY, *EXPLODE], cwd=store.dir, store=store, timeout=180)
    assert proc.returncode == 2, describe_process(proc)
    assert "on_nan=stop" in the_error_line(proc)
    (run,) = all_runs(store.client)
    assert run.info.status == "FAILED" and "on_nan=stop" in run.data.tags[names.ERROR_TAG]
    assert int(run.data.tags[names.NONFINITE_COUNT_TAG]) > 0
    first_bad = int(run.data.tags[names.NONFINITE_FIRST_TAG].rsplit(" ", 1)[1])
    recorded = dict(history(store.client, run.info.run_id, names.grad_norm("conv1")))
    assert math.isnan(recorded[first_bad]) or math.isinf(recorded[first_bad]) or any(
        not math.isfinite(v) for s, v in history(store.client, run.info.run_id, names.TRAIN_LOSS)
        if s == first_bad)
    state = torch.load(checkpoint.path_for(store.dir / "checkpoints", run.info.run_id),
                       weights_only=False)
    assert state["position"]["step"] <= first_bad  # from before the bad step
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_on_nan_continue_records_and_counts_nans_and_finishes(tracking_store):
    store = tracking_store
    proc = run_pipeline(["train", *TINY, *EXPLODE, "--on-nan", "continue", "--max-steps", "6"],
                        cwd=store.dir, store=store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)
    (run,) = all_runs(store.client)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags[names.NONFINITE_COUNT_TAG]) > 0
    losses = history(store.client, run.info.run_id, names.TRAIN_LOSS)
    assert [s for s, _ in losses] == list(range(6))
    assert any(not math.isfinite(v) or abs(v) > 1e300 for _, v in losses)
