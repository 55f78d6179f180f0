"""pipeline.watch on a torch.compile'd model: the identity-op capture, its graph breaks
(none), and its numbers against the eager ones.

Inductor compiles C++ with gcc here, so the compiled test uses one tiny MLP and compiles it
once (tens of seconds on the 2-core machine, more on a cold cache); the graph-break counts
use dynamo's explain, which traces with the eager backend and compiles nothing.
"""
from __future__ import annotations

import mlflow
import pytest
import torch
import torch._dynamo
from mlflow.tracking import MlflowClient
from torch import nn
from torch._dynamo.utils import counters

import pipeline
from pipeline import names
from pipeline.config import ConfigError
from pipeline.probes import GradientProbes
from pipeline.watch_probes import IdentityProbes
from watch_helpers import LAYERS, Net, Reference, assert_rel_close, batches, history

MLP_LAYERS = ["inp", "hidden.0", "hidden.2", "out"]


class MLP(nn.Module):
    """Four linear layers, in-place ReLUs right after probed ones, a 3-wide head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 16))
        self.out = nn.Linear(16, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.out(self.act(self.hidden(self.act(self.inp(x)))))


def _data(steps: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(steps)]


def _loss(out, y, i):
    # Step 2's loss is scaled by 1e-30: every gradient is ~1e-31, whose squares (~1e-62)
    # float32 cannot hold. The compiled norm must be float64 to see it.
    return nn.functional.cross_entropy(out, y) * (1e-30 if i == 2 else 1.0)


def test_a_compiled_model_logs_the_eager_norms_with_no_graph_break(module_tracking_store, tmp_path):
    steps = 4
    data = _data(steps)
    torch.manual_seed(0)
    eager = MLP()
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    ref = Reference(eager, MLP_LAYERS)
    for i, (x, y) in enumerate(data):  # the reference: the eager twin and the test's own hooks
        eager_opt.zero_grad()
        _loss(eager(x), y, i).backward()
        ref.end_step()
        eager_opt.step()

    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch._dynamo.reset()
    counters.clear()
    # fullgraph=True: any graph break would be an error here, not a silent fallback
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with mlflow.start_run() as run, pipeline.watch(compiled, optimizer, layers=MLP_LAYERS) as w:
        for i, (x, y) in enumerate(data):
            loss = _loss(compiled(x), y, i)
            w.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert w.capture == "identity"
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # one forward graph, compiled once
    assert 0 < ref.rows[2]["inp"] < 1e-29  # the tiny step is tiny, and not zero
    for layer in MLP_LAYERS:
        points = history(run.info.run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == list(range(steps)), layer
        for (step, value), row in zip(points, ref.rows):
            # float32 tolerance: inductor orders the float32 sums of forward and backward
            # its own way; the norm itself is float64 (step 2 would read 0 otherwise)
            assert_rel_close(value, row[layer], rel=1e-5, what=f"{layer} at {step}")
    client = MlflowClient()
    artifacts = {a.path for folder in ("plots", "gradients")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {names.NORMS_NPZ, names.GRADIENT_FLOW_PLOT, names.DEPTH_PROFILE_PLOT,
            names.GRADIENT_PLOT} <= artifacts
    tags = client.get_run(run.info.run_id).data.tags
    assert tags[names.WATCH_CAPTURE_TAG] == "identity" and names.HEALTH_TAG in tags


def _explain(probes_class, capture_layers):
    """dynamo's own count of the graph breaks one training forward pass of the MLP takes
    with these probes attached (the eager backend: nothing is compiled)."""
    torch._dynamo.reset()
    model = MLP()
    probes = probes_class(model, tuple(capture_layers), 4, torch.device("cpu"))
    try:
        return torch._dynamo.explain(model)(torch.randn(8, 6))
    finally:
        probes.remove()
        torch._dynamo.reset()


def test_tensor_hooks_break_a_compiled_graph_at_every_probed_layer_and_the_identity_op_at_none():
    # training's probes: a tensor hook per layer whose Python side effect dynamo cannot trace
    hooked = _explain(GradientProbes, MLP_LAYERS)
    assert hooked.graph_break_count == len(MLP_LAYERS)
    assert hooked.graph_count == len(MLP_LAYERS) + 1
    assert all("side effect" in str(r.reason) for r in hooked.break_reasons)
    identity = _explain(IdentityProbes, MLP_LAYERS)
    assert identity.graph_break_count == 0 and identity.graph_count == 1


def test_the_identity_capture_on_an_eager_model_gives_its_own_hooks_norms(module_tracking_store):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model, LAYERS)
    with mlflow.start_run() as run, pipeline.watch(model, optimizer, layers=LAYERS,
                                                   capture="identity") as w:
        for x, y in batches(3):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            ref.end_step()
            optimizer.step()
    assert w.capture == "identity"
    for layer in LAYERS:
        points = history(run.info.run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == [0, 1, 2]
        for (step, value), row in zip(points, ref.rows):
            assert_rel_close(value, row[layer], what=f"{layer} at {step}")


def test_a_model_compiled_in_place_is_refused_in_one_line():
    model = MLP()
    model.compile()
    with pytest.raises(ConfigError, match="^model: compiled in place"):
        pipeline.watch(model, layers="auto")


def test_a_model_compiled_and_run_before_the_watch_is_recompiled_with_its_probes(module_tracking_store):
    """dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards),
    so code compiled before the watch attached would run without its probes, and the code
    compiled with them would keep running them after it detached."""
    data = _data(3)
    torch.manual_seed(0)
    eager = MLP()
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # dynamo alone: nothing for gcc to build
    for net, opt in ((eager, eager_opt), (compiled, optimizer)):
        x, y = data[0]  # a step before the watch: compiles the forward without hooks
        opt.zero_grad()
        _loss(net(x), y, 0).backward()
        opt.step()
    ref = Reference(eager, MLP_LAYERS)
    with mlflow.start_run() as run, pipeline.watch(compiled, optimizer, layers=MLP_LAYERS) as w:
        for i, (x, y) in enumerate(data[1:], start=1):
            for net, opt in ((eager, eager_opt), (compiled, optimizer)):
                loss = _loss(net(x), y, i)
                opt.zero_grad()
                loss.backward()
                if net is eager:
                    ref.end_step()
                opt.step()
    leaves = w.probes.leaves
    for layer in MLP_LAYERS:
        points = history(run.info.run_id, names.grad_norm(layer))
        assert [s for s, _ in points] == [0, 1], layer
        for (step, value), row in zip(points, ref.rows):
            assert_rel_close(value, row[layer], rel=1e-5, what=f"{layer} at {step}")
    x, y = data[0]  # after the watch: the compiled model no longer feeds its leaves
    _loss(compiled(x), y, 0).backward()
    assert all(leaf.grad is None or leaf.grad.item() == 0 for leaf in leaves)
