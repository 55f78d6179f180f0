"""Helpers for the compare / query / all / UI tests: real MLflow stores and real runs.

Imported explicitly by test_compare.py, test_query.py, test_workflow.py and
test_ui_browser.py (``from runs_helpers import ...``); pytest puts tests/ on sys.path.

Two ways to get runs into a store, both real MLflow, no mocks:

* ``make_training_run``: a run that looks like a training run (``variant`` and
  ``steps_per_epoch`` tags, params, ``grad_norm/<layer>`` at steps 0..n-1, epoch metrics),
  with histories the test chooses, so the compare step's numbers can be checked against
  statistics computed here, independently of the pipeline.
* ``trained_pair``: one skip and one noskip run made by ``pipeline.train.run`` on tiny
  synthetic data, trained once per session and copied into each test's own store.
"""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import DEFAULT_EXPERIMENT

REPO_ROOT = Path(__file__).resolve().parents[1]
# `mlflow run --env-manager local` runs the entry point's `python` from PATH, so the venv
# that runs these tests goes first on PATH for every subprocess.
VENV_BIN = os.path.dirname(sys.executable)
# Variables that would attach a process to some other run or experiment.
RUN_VARS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


# --- stores -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Store:
    dir: Path
    uri: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def project_experiment_id(self) -> str:
        """The experiment runs go to by default (``gradient-flow``), created if missing."""
        found = self.client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        return found.experiment_id if found else self.client.create_experiment(DEFAULT_EXPERIMENT)


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def end_active_runs() -> None:
    while mlflow.active_run() is not None:
        mlflow.end_run()


def activate_store(directory: Path, mp: pytest.MonkeyPatch) -> Store:
    """Point this process (env, cwd and mlflow's fluent API) at ``directory``'s store."""
    store = Store(Path(directory).resolve(), sqlite_uri(directory))
    mp.setenv("MLFLOW_TRACKING_URI", store.uri)
    for var in RUN_VARS:
        mp.delenv(var, raising=False)
    mp.chdir(store.dir)
    end_active_runs()
    mlflow.set_tracking_uri(store.uri)
    # Create the database (and the Default experiment, whose artifacts go to ./mlruns/0)
    # now, while the working directory is the store's.
    store.client.search_experiments()
    return store


def deactivate_store() -> None:
    end_active_runs()
    mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI, which monkeypatch restores


_TEMPLATE: dict[str, Path] = {}


def empty_store_template(tmp_path_factory) -> Path:
    """A directory with a freshly created, empty store, made once per session.

    Creating a sqlite store runs MLflow's migrations (~6 s here); copying one takes ms.
    """
    if "dir" not in _TEMPLATE:
        directory = tmp_path_factory.mktemp("empty_store").resolve()
        with pytest.MonkeyPatch.context() as mp:
            activate_store(directory, mp)
            deactivate_store()
        _TEMPLATE["dir"] = directory
    return _TEMPLATE["dir"]


def new_store(directory: Path, mp: pytest.MonkeyPatch, tmp_path_factory,
              source: Path | None = None) -> Store:
    """A store in ``directory``, copied from ``source`` (default: an empty store), activated."""
    copy_store(source or empty_store_template(tmp_path_factory), Path(directory))
    return activate_store(directory, mp)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, tmp_path_factory) -> Store:
    """A fresh sqlite store in tmp_path; env var, cwd and mlflow's tracking URI point at it."""
    store = new_store(tmp_path, monkeypatch, tmp_path_factory)
    yield store
    deactivate_store()


def copy_store(src: Path, dst: Path) -> None:
    """Copy a store (mlflow.db + mlruns/) and repoint its artifact locations at the copy."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "mlflow.db", dst / "mlflow.db")
    if (src / "mlruns").exists():
        shutil.copytree(src / "mlruns", dst / "mlruns", dirs_exist_ok=True)
    old, new = str(src.resolve()), str(dst.resolve())
    con = sqlite3.connect(dst / "mlflow.db")
    try:
        with con:
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                        (old, new))
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    finally:
        con.close()


# --- runs that look like training runs ----------------------------------------------------
@dataclass
class FakeRun:
    run_id: str
    variant: str
    histories: dict[str, np.ndarray]
    steps_per_epoch: int
    epoch_metrics: dict[str, list[float]] = field(default_factory=dict)
    train_loss: np.ndarray | None = None

    @property
    def finals(self) -> dict[str, float]:
        out = {k: v[-1] for k, v in self.epoch_metrics.items()}
        out["train/loss"] = float(self.train_loss[-1])
        return out


_clock = [int(time.time() * 1000) - 10_000_000]


def next_time() -> int:
    """Strictly increasing start times, so 'newest first' is unambiguous."""
    _clock[0] += 1000
    return _clock[0]


def make_training_run(client: MlflowClient, experiment_id: str, variant: str,
                      histories: Mapping[str, Sequence[float]], steps_per_epoch: int,
                      status: str = "FINISHED", model: str = "resnet50",
                      params: Mapping[str, str] | None = None, layers_param: str | None = None,
                      start_time: int | None = None, seed: int = 0) -> FakeRun:
    """A run shaped like ``pipeline.train.run``'s, with the given grad-norm histories.

    Epoch metrics (train/accuracy, test/accuracy, test/loss) get one value per epoch and
    train/loss one per step, all drawn from ``seed`` so each run's finals differ.
    """
    rng = np.random.default_rng(seed)
    histories = {k: np.asarray(v, dtype=np.float64) for k, v in histories.items()}
    n = len(next(iter(histories.values()))) if histories else steps_per_epoch
    epochs = max(1, -(-n // steps_per_epoch))
    tags = {"variant": variant, "model": model, "steps_per_epoch": str(steps_per_epoch)}
    run = client.create_run(experiment_id, start_time=start_time or next_time(), tags=tags,
                            run_name=f"{model}-{variant}")
    run_id = run.info.run_id
    p = {"skip": "true" if variant == "skip" else "false", "model": model,
         "layers": layers_param if layers_param is not None else ",".join(histories),
         "epochs": str(epochs), "lr": "0.001", "seed": "0", "dataset": "synthetic"}
    p.update(params or {})
    ts = start_time or _clock[0]
    metrics = []
    for layer, values in histories.items():
        metrics += [Metric(f"grad_norm/{layer}", float(v), ts + s, s) for s, v in enumerate(values)]
    train_loss = rng.uniform(0.5, 2.5, size=n)
    metrics += [Metric("train/loss", float(v), ts + s, s) for s, v in enumerate(train_loss)]
    epoch_metrics = {"train/accuracy": rng.uniform(0, 1, epochs).tolist(),
                     "test/accuracy": rng.uniform(0, 1, epochs).tolist(),
                     "test/loss": rng.uniform(0.5, 3, epochs).tolist()}
    for key, values in epoch_metrics.items():
        metrics += [Metric(key, float(v), ts + e, e) for e, v in enumerate(values)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_batch(run_id, params=[Param(k, v) for k, v in p.items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return FakeRun(run_id, variant, histories, steps_per_epoch, epoch_metrics, train_loss)


def make_plain_run(client: MlflowClient, experiment_id: str, name: str,
                   tags: Mapping[str, str] | None = None, status: str = "FINISHED") -> str:
    """A run that is not a training run (no variant tag), like a compare or `all` run."""
    run = client.create_run(experiment_id, start_time=next_time(), tags=dict(tags or {}),
                            run_name=name)
    client.log_batch(run.info.run_id, metrics=[Metric("something", 1.0, next_time(), 0)])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def level(rng: np.random.Generator, centre: float, n: int, spread: float = 0.3) -> np.ndarray:
    """``n`` positive values scattered (log-normally) around ``centre``."""
    return centre * np.exp(rng.normal(0.0, spread, size=n))


def collapse_histories(seed: int = 0, steps_per_epoch: int = 10) -> dict[str, dict[str, np.ndarray]]:
    """Two epochs per variant, chosen so every status shows up and the skip run dies.

    noskip: conv1 ~1e-21 (Vanishing), layer1.0.conv1 ~1e-12 (Tiny), fc ~1 (reference).
    skip:   conv1 healthy (~0.3) in epoch 1, exactly 0 in all of epoch 2 (Dead overall and
            in epoch 2); layer1.0.conv1 ~1e-5 (Weak) then ~1e4 (Exploding); fc ~1.
    """
    rng = np.random.default_rng(seed)
    e = steps_per_epoch
    noskip = {"conv1": level(rng, 1e-21, 2 * e),
              "layer1.0.conv1": level(rng, 1e-12, 2 * e),
              "fc": level(rng, 1.0, 2 * e)}
    skip = {"conv1": np.concatenate([level(rng, 0.3, e), np.zeros(e)]),
            "layer1.0.conv1": np.concatenate([level(rng, 1e-5, e), level(rng, 1e4, e)]),
            "fc": level(rng, 1.0, 2 * e)}
    return {"noskip": noskip, "skip": skip}


def make_pair(store: Store, experiment_id: str | None = None, seed: int = 0,
              steps_per_epoch: int = 10) -> dict[str, FakeRun]:
    experiment_id = experiment_id or store.project_experiment_id()
    h = collapse_histories(seed, steps_per_epoch)
    return {v: make_training_run(store.client, experiment_id, v, h[v], steps_per_epoch,
                                 seed=seed * 10 + i)
            for i, v in enumerate(("noskip", "skip"))}


# --- a real trained pair, once per session ------------------------------------------------
TINY_TRAIN = dict(dataset="synthetic", image_size=32, epochs=2, batch_size=8,
                  synthetic_size=32, synthetic_test_size=16, max_steps=8, num_workers="0",
                  flush_every=4, device="cpu")


@dataclass(frozen=True)
class TrainedPair:
    dir: Path
    noskip: str
    skip: str


_TRAINED: dict[str, TrainedPair] = {}


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory) -> TrainedPair:
    """A store holding one noskip and one skip run from ``pipeline.train.run`` (tiny).

    Cached in this module, so the test files that import the fixture share one training.
    Use ``copy_store(pair.dir, tmp_path)`` before writing to it.
    """
    if "pair" not in _TRAINED:
        from pipeline import train
        from pipeline.config import Config

        directory = tmp_path_factory.mktemp("trained_pair")
        with pytest.MonkeyPatch.context() as mp:
            activate_store(directory, mp)
            try:
                ids = {skip: train.run(Config(skip=skip, **TINY_TRAIN)) for skip in (False, True)}
            finally:
                deactivate_store()
        _TRAINED["pair"] = TrainedPair(directory.resolve(), ids[False], ids[True])
    return _TRAINED["pair"]


# --- subprocesses ---------------------------------------------------------------------------
def subprocess_env(store: Store) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARS}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    env["MLFLOW_TRACKING_URI"] = store.uri
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_pipeline(store: Store, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in the store's directory, against the store."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=store.dir,
                          env=subprocess_env(store), capture_output=True, text=True,
                          timeout=timeout)


def run_mlflow(store: Store, entry_point: str, params: Mapping[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    """``mlflow run <repo> --env-manager local -e ENTRY -P k=v ...`` against the store."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "--env-manager", "local",
           "-e", entry_point]
    for k, v in (params or {}).items():
        cmd += ["-P", f"{k}={v}"]
    # As the README (and `make run`) has it: `mlflow run` opens its run in this experiment.
    env = {**subprocess_env(store), "MLFLOW_EXPERIMENT_NAME": DEFAULT_EXPERIMENT}
    return subprocess.run(cmd, cwd=store.dir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
            f"\n--- stderr ---\n{proc.stderr[-5000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, log, timeout: float = 120,
                    poll: float = 0.2) -> None:
    """Until ``url``/health answers 200; fails with ``log()`` (the server's output) if the
    process ``proc`` exits first or ``timeout`` s pass."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer /health within {timeout:.0f} s:\n{log()}")
        time.sleep(poll)
