"""Gradient probes: accuracy, equivalence with the notebook's hooks, chunking, layer checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import config
from pipeline.config import ConfigError
from pipeline.models import build_model
from pipeline import probes as probes_mod
from pipeline.probes import GradientProbes, check_layers

CPU = torch.device("cpu")
IMAGE_SIZE = 32
REL = 1e-6


def assert_rel_close(got: float, expected: float, rel: float = REL, what: str = "") -> None:
    assert expected != 0, f"{what}: the reference is 0, so the comparison would prove nothing"
    assert math.isfinite(got), f"{what}: {got}"
    assert abs(got - expected) <= rel * abs(expected), f"{what}: got {got!r}, expected {expected!r}"


class Tiny(nn.Module):
    """One Linear layer, so a test controls dLoss/d(output) exactly: loss = (out * c).sum()."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.lin = nn.Linear(4, width)

    def forward(self, x):
        return self.lin(x)


def controlled_step(model: Tiny, probes: GradientProbes, c: torch.Tensor):
    """One step whose output gradient is exactly ``c``; returns (commit's chunk, loss)."""
    out = model(torch.ones(c.shape[0], 4))
    loss = (out * c).sum()
    loss.backward()
    return probes.commit(loss), loss


def exact_norm(c: torch.Tensor) -> float:
    """The L2 norm in Python floats (IEEE double), one entry at a time: no torch reduction."""
    return math.sqrt(math.fsum(float(v) ** 2 for v in c.flatten().tolist()))


# --- (a) accuracy ----------------------------------------------------------------------------
def tiny_gradient(seed: int = 0, shape=(8, 64), scale: float = 1e-30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # entries in [0.5e-30, 1.5e-30] with random signs: normal float32 numbers (> 1.2e-38),
    # whose squares (~1e-60) are far below float32's smallest subnormal (1.4e-45).
    magnitude = (0.5 + torch.rand(shape, generator=g)) * scale
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(torch.float32)


def test_probe_norm_of_a_1e30_gradient_is_accurate_to_1e6_relative():
    model = Tiny()
    c = tiny_gradient()
    assert c.abs().min() > 0  # float32 holds the entries themselves
    probes = GradientProbes(model, ("lin",), flush_every=10, device=CPU)
    _, loss = controlled_step(model, probes, c)
    values = probes.drain().values()
    expected = exact_norm(c)
    assert 1e-30 < expected < 1e-27
    assert_rel_close(values[0, 0], expected, what="probe norm")
    assert values[0, 1] == float(loss.detach())


def test_float32_norm_underflows_on_a_1e30_gradient_which_is_why_probes_use_float64():
    # Documents the failure the probes avoid (docs: internals/probes.md): the squares
    # underflow, so the float32 norm is 0 or far off, while the float64 reduction is exact.
    c = tiny_gradient()
    expected = exact_norm(c)
    float32_norm = float(c.norm())
    assert abs(float32_norm - expected) > 0.5 * expected
    assert_rel_close(float(torch.linalg.vector_norm(c, dtype=torch.float64)), expected)


@pytest.mark.parametrize("scale", [1e-38, 1e-20, 1.0, 1e20, 1e30])
def test_probe_norm_is_accurate_across_magnitudes_from_1e38_to_1e30(scale):
    model = Tiny()
    c = tiny_gradient(seed=1, scale=scale)
    probes = GradientProbes(model, ("lin",), flush_every=4, device=CPU)
    controlled_step(model, probes, c)
    assert_rel_close(probes.drain().values()[0, 0], exact_norm(c), what=f"scale {scale}")


# --- (b) equivalence with the notebook's hooks --------------------------------------------
def notebook_hook_norms(model: nn.Module, layers, x, y) -> dict[str, list[float]]:
    """The notebook's register_full_backward_hook on grad_output[0], norm taken in float64."""
    found: dict[str, list[float]] = {name: [] for name in layers}
    handles = []
    for name, module in model.named_modules():
        if name in layers:
            def hook(module, grad_input, grad_output, name=name):
                found[name].append(float(torch.linalg.vector_norm(grad_output[0], dtype=torch.float64)))
            handles.append(module.register_full_backward_hook(hook))
    try:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return found


def probe_norms(model: nn.Module, layers, x, y) -> tuple[np.ndarray, float]:
    probes = GradientProbes(model, tuple(layers), flush_every=5, device=CPU)
    try:
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert probes.commit(loss) is None  # 1 row of 5: no chunk yet
        chunk = probes.drain()
    finally:
        probes.remove()
    values = chunk.values()
    assert values.shape == (1, len(layers) + 1)
    return values[0], float(loss.detach())


def small_batch(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


# conv1's input (the image) needs no gradient; PyTorch warns that the full hook then
# fires on the output gradient, which is exactly the notebook's grad_output[0].
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("skip", [False, True])
def test_probe_norms_equal_notebook_full_backward_hook_norms_in_float64(skip):
    torch.manual_seed(0)
    model = build_model("resnet50", skip=skip).train()
    layers = config.DEFAULT_LAYERS
    x, y = small_batch()
    probed, loss = probe_norms(model, layers, x, y)
    reference = notebook_hook_norms(model, layers, x, y)
    for col, layer in enumerate(layers):
        assert len(reference[layer]) == 1, layer
        assert_rel_close(probed[col], reference[layer][0], what=layer)
    assert probed[-1] == pytest.approx(loss, rel=1e-6)
    if not skip:  # the founding result: early gradients vanish without skips
        assert probed[0] < 1e-12 * probed[-2]


@pytest.mark.parametrize("layer", ["layer1.0.relu", "layer2.1.relu"])
def test_module_called_several_times_reports_root_of_summed_squared_output_gradient_norms(layer):
    # Each Bottleneck calls its one ReLU three times per forward.
    torch.manual_seed(1)
    model = build_model("resnet50", skip=True).train()
    x, y = small_batch(n=2, seed=1)
    probed, _ = probe_norms(model, (layer,), x, y)
    reference = notebook_hook_norms(model, (layer,), x, y)[layer]
    assert len(reference) == 3
    expected = math.sqrt(math.fsum(v * v for v in reference))
    assert_rel_close(probed[0], expected, what=layer)
    assert probed[0] > max(reference) * (1 + 1e-9)  # not just the last (or largest) call


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_more_layers_than_one_reduction_group_still_equal_the_notebook_hook_norms():
    # Every conv and the head: 54 layers, so the kept gradients are reduced in several groups,
    # some of them during backward.
    torch.manual_seed(3)
    model = build_model("resnet50", skip=True).train()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) > 3 * probes_mod.GROUP
    x, y = small_batch(n=2, seed=3)
    probed, _ = probe_norms(model, layers, x, y)
    reference = notebook_hook_norms(model, layers, x, y)
    for col, layer in enumerate(layers):
        assert_rel_close(probed[col], reference[layer][0], what=layer)


class CountOps(TorchDispatchMode):
    """Counts the ATen ops that run (each one kernel or more on a GPU); views are free."""

    VIEWS = {"view", "_unsafe_view", "select", "slice", "as_strided", "t", "expand", "unsqueeze",
             "squeeze", "detach", "alias", "permute", "transpose", "_reshape_alias", "unbind"}

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def ops_per_step(model: nn.Module, layers, weights: bool, probed: bool) -> int:
    probes = GradientProbes(model, tuple(layers), flush_every=10, device=CPU,
                            weights=weights) if probed else None
    x, y = small_batch(n=2)

    def step():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if probes is not None:
            probes.record(loss)

    step()
    with CountOps() as counter:
        step()
    if probes is not None:
        probes.remove()
    return counter.ops


@pytest.mark.parametrize("weights", [False, True])
def test_probes_add_eight_ops_to_a_step_whether_they_watch_five_layers_or_sixteen(weights):
    # At batch 16 a CUDA graph's step costs about its kernel count (docs: Internals), so a
    # per-layer op count is a per-layer cost; the reduction is grouped to keep it flat. With
    # probe=weight a biased layer (the default five end with fc) adds its weight's and its
    # bias's squares into one column: a second round of index_add_, so that the order of the
    # two additions is fixed (probes._rounds), costs one more.
    torch.manual_seed(0)
    model = build_model("resnet50", skip=False).train()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert all(model.get_submodule(n).bias is None for n in convs)
    bare = ops_per_step(model, (), weights=False, probed=False)
    five = ops_per_step(model, config.DEFAULT_LAYERS, weights, probed=True) - bare
    sixteen = ops_per_step(model, convs[:probes_mod.GROUP], weights, probed=True) - bare
    assert sixteen == 8
    assert five == (9 if weights else 8)


def test_several_additions_into_one_column_go_in_rounds_in_the_order_of_the_hooks():
    probes = GradientProbes(Tiny(width=4), ("lin",), flush_every=2, device=CPU)
    order, rounds = probes._rounds((0, 2, 0, 3, 0, 2))
    assert order == [0, 1, 3, 2, 5, 4]  # first calls, then second calls, then the third
    assert [(a, b, cols.tolist()) for a, b, cols in rounds] == \
        [(0, 3, [0, 2, 3]), (3, 5, [0, 2]), (5, 6, [0])]
    order, rounds = probes._rounds((0, 1, 2))
    assert order == [0, 1, 2] and len(rounds) == 1  # distinct columns: one round
    probes.remove()


# --- (c) check_layers ---------------------------------------------------------------------------
def test_unknown_layer_is_refused_with_the_closest_module_names():
    model = build_model("resnet50", skip=False)
    with pytest.raises(ConfigError) as excinfo:
        check_layers(model, ("conv1", "layer1.0.conv"), IMAGE_SIZE)
    message = str(excinfo.value)
    assert excinfo.value.param == "layers"
    assert message.startswith("layers:")
    assert "'layer1.0.conv'" in message
    assert "layer1.0.conv1" in message
    assert "allowed: auto, all, or its module names" in message
    assert "\n" not in message


def test_unknown_layer_far_from_any_module_is_still_refused_with_examples():
    model = build_model("resnet50", skip=False)
    with pytest.raises(ConfigError) as excinfo:
        check_layers(model, ("zzzz",), IMAGE_SIZE)
    message = str(excinfo.value)
    assert message.startswith("layers:")
    assert "zzzz" in message
    assert "allowed: auto, all, or its module names" in message
    assert "conv1" in message  # the model's first modules, as examples


def test_downsample_conv_that_never_runs_with_skip_off_is_refused():
    model = build_model("resnet50", skip=False)
    with pytest.raises(ConfigError) as excinfo:
        check_layers(model, ("conv1", "layer1.0.downsample"), IMAGE_SIZE)
    assert str(excinfo.value).startswith("layers:")
    assert "layer1.0.downsample" in str(excinfo.value)
    assert "conv1," not in str(excinfo.value)  # only the dead one is named


def test_downsample_conv_is_accepted_with_skip_on_and_check_leaves_the_model_usable():
    model = build_model("resnet50", skip=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_layers(model, ("layer1.0.downsample", "fc", "layer4"), IMAGE_SIZE)
    assert all(p.device.type == "cpu" for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_hooks and not model.layer1[0].downsample._forward_hooks


def test_default_layers_are_accepted_for_both_variants():
    for skip in (False, True):
        check_layers(build_model("resnet50", skip=skip), config.DEFAULT_LAYERS, IMAGE_SIZE)


# --- (d) chunking -------------------------------------------------------------------------------
def test_commit_hands_over_a_chunk_every_flush_every_steps_and_drain_returns_the_rest():
    model = Tiny(width=16)
    probes = GradientProbes(model, ("lin",), flush_every=3, device=CPU)
    chunks, returned_at, grads, losses = [], [], [], []
    for step in range(7):
        c = tiny_gradient(seed=10 + step, shape=(2, 16), scale=10.0 ** (-step))
        chunk, loss = controlled_step(model, probes, c)
        model.zero_grad(set_to_none=True)
        grads.append(c)
        losses.append(float(loss.detach()))
        if chunk is not None:
            returned_at.append(step + 1)  # after this many steps
            chunks.append(chunk)
    rest = probes.drain()
    assert returned_at == [3, 6]
    assert rest is not None
    chunks.append(rest)
    assert probes.drain() is None  # nothing left

    assert [ch.first_step for ch in chunks] == [0, 3, 6]
    tables = [ch.values() for ch in chunks]
    assert [t.shape for t in tables] == [(3, 2), (3, 2), (1, 2)]
    assert [len(ch.timestamps_ms) for ch in chunks] == [3, 3, 1]
    rows = np.concatenate(tables)
    assert rows.dtype == np.float64
    # Each row holds exactly its own step: no carry-over between steps or chunks.
    for step in range(7):
        assert_rel_close(rows[step, 0], exact_norm(grads[step]), what=f"step {step}")
        assert rows[step, 1] == losses[step]


def test_a_chunk_keeps_its_values_after_the_buffer_is_reused():
    model = Tiny(width=8)
    probes = GradientProbes(model, ("lin",), flush_every=2, device=CPU)
    first = [controlled_step(model, probes, tiny_gradient(seed=s, shape=(1, 8), scale=1.0))[0]
             for s in range(2)][-1]
    for s in range(2, 4):
        model.zero_grad(set_to_none=True)
        controlled_step(model, probes, tiny_gradient(seed=s, shape=(1, 8), scale=1e6))
    values = first.values()
    assert values[:, 0].max() < 100  # rows of scale 1, not overwritten by the 1e6 steps


# --- (e) eval / no_grad -------------------------------------------------------------------------
def test_probes_record_nothing_during_eval_and_no_grad_forwards():
    model = Tiny(width=8)
    probes = GradientProbes(model, ("lin",), flush_every=4, device=CPU)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.ones(2, 4))
    assert probes.row == 0
    assert not probes.buf.any()
    assert probes.drain() is None

    model.train()
    c = tiny_gradient(seed=3, shape=(2, 8), scale=1.0)
    controlled_step(model, probes, c)
    values = probes.drain().values()
    assert values.shape == (1, 2)
    assert_rel_close(values[0, 0], exact_norm(c), what="the one training step")


def test_removed_probes_record_nothing():
    model = Tiny(width=8)
    probes = GradientProbes(model, ("lin",), flush_every=4, device=CPU)
    probes.remove()
    out = model(torch.ones(2, 4))
    out.sum().backward()
    assert not probes.buf.any()


# --- (g) no host sync -----------------------------------------------------------------------------
@pytest.mark.gpu  # only CUDA can detect a device->host sync
def test_a_probed_step_makes_no_host_sync_on_cuda():
    device = torch.device("cuda")
    model = build_model("resnet50", skip=False).to(device).train()
    probes = GradientProbes(model, config.DEFAULT_LAYERS, flush_every=2, device=device)
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y = torch.randint(0, 10, (2,), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return probes.commit(loss)

    step()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunk = step()  # the second row: commit drains, so the copy path runs too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert chunk is not None
    values = chunk.values()
    assert np.isfinite(values).all() and (values[:, -2] > 0).all()


# --- bf16 autocast: the norms are still reduced in float64 ----------------------------------
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_probe_norms_under_bf16_autocast_equal_float64_full_hook_norms():
    torch.manual_seed(2)
    model = build_model("resnet50", skip=True).train()
    layers = ("conv1", "layer2.0.conv2", "fc")
    x, y = small_batch(n=2, seed=2)
    found = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [modules[name].register_full_backward_hook(
        lambda m, gi, go, name=name: found[name].append(
            float(torch.linalg.vector_norm(go[0], dtype=torch.float64))))
        for name in layers]
    probes = GradientProbes(model, layers, flush_every=2, device=CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16
    loss.backward()
    probes.commit(loss)
    values = probes.drain().values()[0]
    for h in handles:
        h.remove()
    probes.remove()
    for col, name in enumerate(layers):
        assert_rel_close(values[col], found[name][0], what=name)
