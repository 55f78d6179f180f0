"""probe=weight|both: weight-gradient norms, measured after backward and before the
optimizer step with one grouped float64 foreach norm (pipeline/probes.py)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import engine, names
from pipeline.config import ALL_LAYERS, Config, ConfigError
from pipeline.probes import GradientProbes, check_layers

CPU = torch.device("cpu")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def _step(probes_kwargs, scale: float = 1.0):
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = GradientProbes(model, ("conv", "fc"), 4, CPU, **probes_kwargs)
    step = engine.Step(model, optimizer, probes, contextlib.nullcontext, CPU, graph=False)
    x, y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    step(x, y)
    probes.advance()
    grads = {n: [p.grad.double() for p in m.parameters(recurse=False)]
             for n, m in (("conv", model.conv), ("fc", model.fc))}
    return probes.drain().values(), grads


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t ** 2).sum() for t in tensors)))


def test_weight_norms_are_each_layers_weight_and_bias_gradient_norm_before_the_update():
    values, grads = _step({"weights": True})
    # columns: conv, fc (outputs), loss, conv, fc (weights)
    assert values.shape == (1, 5)
    np.testing.assert_allclose(values[0, 3:], [_norm(grads["conv"]), _norm(grads["fc"])],
                               rtol=1e-12)
    assert 2.0 < values[0, 2] < 2.6  # the loss stays where it was, unsquared


def test_weight_only_measures_no_output_gradient_and_keeps_the_loss_first():
    both, _ = _step({"weights": True})
    only, _ = _step({"weights": True, "outputs": False})
    assert only.shape == (1, 3)  # loss, conv, fc
    np.testing.assert_array_equal(only[0], both[0, 2:])


def test_weight_norms_keep_their_digits_where_float32_squares_underflow():
    # Gradients of ~1e-30 (the no-skip network's early layers reach 1e-21 and below): their
    # squares, ~1e-60, are far below float32's smallest subnormal (1.4e-45).
    model = Tiny()
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-30
    probes = GradientProbes(model, ("conv", "fc"), 2, CPU, weights=True, outputs=False)
    probes.record(torch.tensor(2.3))
    probes.advance()
    values = probes.drain().values()
    expected = [_norm([p.grad.double() for p in m.parameters(recurse=False)])
                for m in (model.conv, model.fc)]
    np.testing.assert_allclose(values[0], [2.3, *expected], rtol=1e-6)  # the loss: float32's
    np.testing.assert_allclose(values[0, 1:], expected, rtol=1e-12)
    assert float(model.conv.weight.grad.square().sum()) == 0.0  # what float32 squares give


def test_probe_weight_refuses_a_layer_that_owns_no_parameters():
    with pytest.raises(ConfigError, match="relu own"):
        check_layers(Tiny(), ("conv", "relu"), 8, weights=True)
    check_layers(Tiny(), ("conv", "relu"), 8)  # output gradients exist there


def test_probe_takes_output_weight_or_both():
    assert Config().probe == "output"
    cfg = Config.from_strings({"probe": "Both"})
    assert cfg.probes_outputs and cfg.probes_weights
    with pytest.raises(ConfigError, match="probe: 'grad' is not allowed; allowed: output, weight, both"):
        Config.from_strings({"probe": "grad"})


def test_a_run_with_probe_both_logs_weight_norm_metrics_equal_to_its_dense_artifact(
        tracking_store, tmp_path):
    from mlflow import MlflowClient

    from pipeline import train

    run_id = train.run(Config(layers=ALL_LAYERS, probe="both", metric_every=2, model="resnet18",
                              dataset="synthetic", image_size=32, batch_size=4,
                              synthetic_size=16, max_steps=4, num_workers="0", device="cpu",
                              log_model="false"))
    client = MlflowClient()
    path = client.download_artifacts(run_id, names.NORMS_NPZ, str(tmp_path))
    with np.load(path, allow_pickle=False) as f:
        dense = {k: f[k] for k in f.files}
    layers = list(dense["layers"])
    assert dense["weight_norms"].shape == dense["norms"].shape == (4, len(layers))
    assert (dense["weight_norms"] > 0).all()
    for layer in ("conv1", "fc", "layer2.0.conv1"):  # every step; every 2nd step
        history = sorted((m.step, m.value) for m in
                         client.get_metric_history(run_id, names.weight_grad_norm(layer)))
        column = dense["weight_norms"][:, layers.index(layer)]
        assert history == [(s, column[s]) for s in
                           (range(4) if layer in ("conv1", "fc") else (0, 2))]
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {names.WEIGHT_GRADIENT_FLOW_PLOT, names.WEIGHT_DEPTH_PROFILE_PLOT,
            names.GRADIENT_FLOW_PLOT} <= artifacts
