"""Where runs go (the ``experiment`` parameter) and which device a run picks (issue 8).

Real stores, real ``python -m pipeline`` and ``mlflow run`` processes; tiny sizes.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline import devices
from pipeline.config import DEFAULT_EXPERIMENT, Config, ConfigError
from pipeline.probes import GradientProbes

from conftest import describe_process, run_mlflow_project, run_pipeline, the_error_line

# Where a run goes does not depend on the network: the smallest ResNet.
TINY = ["--dataset", "synthetic", "--image-size", "32", "--synthetic-size", "16",
        "--synthetic-test-size", "8", "--batch-size", "4", "--max-steps", "2", "--epochs", "1",
        "--num-workers", "0", "--device", "cpu", "--model", "resnet18"]


def experiments_with_runs(client: MlflowClient) -> dict[str, int]:
    return {e.name: len(client.search_runs([e.experiment_id]))
            for e in client.search_experiments() if client.search_runs([e.experiment_id])}


def train_proc(store, *args, **env):
    proc = run_pipeline(["train", *TINY, *args], cwd=store.dir, store=store, timeout=180, **env)
    assert proc.returncode == 0, describe_process(proc)
    return proc


# --- the experiment -------------------------------------------------------------------------
def test_a_run_started_directly_goes_to_the_gradient_flow_experiment_created_for_it(tracking_store):
    train_proc(tracking_store)
    assert experiments_with_runs(tracking_store.client) == {DEFAULT_EXPERIMENT: 1}


def test_mlflow_experiment_name_in_the_environment_takes_the_place_of_the_default(tracking_store):
    train_proc(tracking_store, MLFLOW_EXPERIMENT_NAME="my-study")
    assert experiments_with_runs(tracking_store.client) == {"my-study": 1}


def test_an_explicit_experiment_parameter_wins_over_the_environment(tracking_store):
    train_proc(tracking_store, "--experiment", "chosen", MLFLOW_EXPERIMENT_NAME="my-study")
    assert experiments_with_runs(tracking_store.client) == {"chosen": 1}


def test_compare_and_all_look_in_the_experiment_training_used(tracking_store):
    for skip in ("false", "true"):
        train_proc(tracking_store, "--skip", skip, "--experiment", "study")
    # Nothing in the default experiment: compare must be told, and finds both there.
    proc = run_pipeline(["compare"], cwd=tracking_store.dir, store=tracking_store)
    assert proc.returncode == 2 and "gradient-flow" in proc.stderr, describe_process(proc)
    proc = run_pipeline(["compare", "--experiment", "study"], cwd=tracking_store.dir,
                        store=tracking_store)
    assert proc.returncode == 0, describe_process(proc)
    # `all` with the same experiment reuses both runs and puts its own runs there too.
    proc = run_pipeline(["all", *TINY, "--experiment", "study"], cwd=tracking_store.dir,
                        store=tracking_store, timeout=180)
    assert proc.returncode == 0, describe_process(proc)
    assert proc.stderr.count("reusing FINISHED run") == 2
    assert experiments_with_runs(tracking_store.client) == {"study": 2 + 1 + 1 + 1}


@pytest.mark.slow
def test_mlflow_run_opens_its_run_in_the_experiment_named_by_the_environment(tracking_store):
    params = {"dataset": "synthetic", "image_size": "32", "synthetic_size": "16",
              "synthetic_test_size": "8", "batch_size": "4", "max_steps": "2", "epochs": "1",
              "num_workers": "0", "device": "cpu"}
    proc = run_mlflow_project(params, cwd=tracking_store.dir, store=tracking_store,
                              MLFLOW_EXPERIMENT_NAME=DEFAULT_EXPERIMENT)  # as `make run` sets it
    assert proc.returncode == 0, describe_process(proc)
    assert experiments_with_runs(tracking_store.client) == {DEFAULT_EXPERIMENT: 1}


@pytest.mark.slow
def test_mlflow_run_with_a_disagreeing_experiment_parameter_is_refused_and_its_run_failed(tracking_store):
    proc = run_mlflow_project({"experiment": "elsewhere", "dataset": "synthetic"},
                              cwd=tracking_store.dir, store=tracking_store)
    assert proc.returncode != 0
    assert "--experiment-name elsewhere" in the_error_line(proc, "error: experiment:")
    runs = tracking_store.client.search_runs(
        [e.experiment_id for e in tracking_store.client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "experiment" in runs[0].data.tags["error"]


# --- the device ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available() or sys.platform == "darwin",
                    reason="needs a machine without CUDA and without Apple's MPS")
def test_device_auto_is_the_cpu_on_a_machine_without_a_gpu():
    assert devices.resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
def test_device_auto_is_the_gpu_on_a_machine_with_cuda():
    assert devices.resolve_device("auto") == torch.device("cuda")


def test_asking_for_an_absent_mps_device_names_the_parameter_and_what_is_there():
    if devices.mps_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match=r"^device: mps was asked for .*allowed here: auto, .*cpu"):
        devices.resolve_device("mps")


def test_an_mps_run_says_in_one_line_what_works_differently_there():
    (line,) = devices.device_notes(torch.device("mps"))
    assert "float32" in line and "CPU" in line
    assert devices.device_notes(torch.device("cpu")) == []


def test_mps_is_an_allowed_device_value():
    assert Config.from_strings({"device": "MPS"}).device == "mps"


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 64)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("scale", [1e-30, 1e-21, 1.0, 1e20])
def test_the_float32_fallback_for_mps_measures_tiny_norms_to_float32_accuracy(scale):
    # MPS has no float64; the fallback must still see 1e-21 gradients (a plain float32
    # norm reads 0 there: its squares underflow). Exercised on the CPU with dtype float32.
    g = torch.Generator().manual_seed(1)
    c = ((0.5 + torch.rand(8, 64, generator=g)) * scale
         * torch.where(torch.rand(8, 64, generator=g) < 0.5, -1.0, 1.0)).float()
    model = Lin()
    probes = GradientProbes(model, ("lin",), flush_every=4, device=torch.device("cpu"),
                            dtype=torch.float32)
    for _ in range(2):  # the module runs twice in one step: norms combine as sqrt(a^2 + b^2)
        out = model(torch.rand(8, 4))
        (out * c).sum().backward()
    probes.commit(torch.tensor(1.0))
    got = probes.drain().values()[0, 0]
    exact = math.sqrt(2) * math.sqrt(math.fsum(float(v) ** 2 for v in c.flatten().tolist()))
    assert got == pytest.approx(exact, rel=1e-5)
    if scale == 1e-30:  # what the fallback avoids: a plain float32 norm's squares underflow
        assert torch.linalg.vector_norm(c).item() < 0.5 * exact / math.sqrt(2)
