"""The fast training path: data on the device, one step body run eagerly or as a CUDA graph.

The claim under test is "faster, same numbers":

* The device data path hands the step the same pixels in the same order as the notebook's
  DataLoader + PIL path, bit for bit, whether it resizes once up front or per batch.
  Checked on the CPU, where both paths run; the resize's float64 GEMMs on CUDA too.
* A captured CUDA graph replays the eager body's kernels on the same inputs in the same
  order, so with deterministic cuDNN algorithms its losses, norms and weights equal the
  eager step's exactly (tolerance 0). GPU only.
* A steady-state step never synchronises the host with the device. GPU only.

GPU tests (marked ``gpu``) skip on a machine without CUDA, with that reason; ``bench/gpu_check.sh
tests`` runs every one of them. ``GPU_REPORT_DIR``, when set,
receives the measured differences as JSON (bench/gpu_check.sh sets it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import data as data_mod
from pipeline import device_data, engine, names, resize
from pipeline.config import DEFAULT_LAYERS, Config
from pipeline.models import build_model
from pipeline.probes import GradientProbes
from pipeline.devices import precision_mode

from conftest import describe_process, make_image_folder, run_pipeline

CPU = torch.device("cpu")
needs_cuda = pytest.mark.gpu  # skips without CUDA (conftest); bench/gpu_check.sh runs it


def cfg_for(**values) -> Config:
    base = {"num_workers": "0", "image_size": "32", "batch_size": "4", "dataset": "synthetic",
            "synthetic_size": "22", "synthetic_test_size": "10", "device": "cpu"}
    base.update({k: str(v) for k, v in values.items()})
    return Config.from_strings(base)


def epochs_of(batches, epochs: int):
    return [[(x.clone(), y.clone()) for x, y in batches] for _ in range(epochs)]


def report(name: str, values: dict) -> None:
    folder = os.environ.get("GPU_REPORT_DIR")
    if folder:
        Path(folder, f"{name}.json").write_text(json.dumps(values, indent=2))


# --- the device data path ---------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [32, 36, 224])
def test_device_data_path_yields_the_dataloaders_batches_bit_for_bit_in_the_same_order(image_size):
    cfg = dict(image_size=image_size, batch_size=4, synthetic_size=22)  # 22 = 5 full + a partial
    loader = data_mod.build(cfg_for(data_path="dataloader", **cfg), CPU)
    device = data_mod.build(cfg_for(data_path="device", **cfg), CPU)
    assert device.path == "device" and loader.path == "dataloader"
    assert device.resize == device_data.RESIZE_NOTES["native" if image_size == 32 else "device-once"]
    assert device.train.images.shape[-1] == image_size
    assert len(device.train) == len(loader.train) == 6
    # Two epochs: the order changes between them, identically on both paths.
    ref, got = epochs_of(loader.train, 2), epochs_of(device.train, 2)
    assert [y.tolist() for _, y in ref[0]] != [y.tolist() for _, y in ref[1]]
    for e in range(2):
        for (xr, yr), (xg, yg) in zip(ref[e], got[e], strict=True):
            assert torch.equal(yr, yg)
            assert xg.dtype == torch.float32 and torch.equal(xr, xg)
    # The test split: same images and labels (the device path batches it more coarsely).
    xr, yr = map(torch.cat, zip(*loader.test))
    xg, yg = map(torch.cat, zip(*device.test))
    assert torch.equal(yr, yg) and torch.equal(xr, xg)


def test_device_data_path_reads_an_image_folder_like_the_dataloader(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 2, "test": 1}, size=(20, 24))
    cfg = dict(dataset="imagefolder", data_dir=tmp_path, image_size=33, batch_size=8)
    loader = data_mod.build(cfg_for(data_path="dataloader", **cfg), CPU)
    device = data_mod.build(cfg_for(data_path="device", **cfg), CPU)
    for (xr, yr), (xg, yg) in zip(loader.train, device.train, strict=True):
        assert torch.equal(xr, xg) and torch.equal(yr, yg)


@pytest.mark.parametrize("image_size", [224, 36])
def test_device_data_path_resizes_each_batch_bit_for_bit_like_pil_when_memory_is_short(
        monkeypatch, image_size):
    # Room for the native 32 px images (14 + 16 of 3 KB) but not for the resized set and
    # the resize's scratch: they stay on the device and each batch is resized there.
    monkeypatch.setattr(device_data, "_free_bytes", lambda device: 2 << 20)
    cfg = dict(image_size=image_size, batch_size=4, synthetic_size=14)
    loader = data_mod.build(cfg_for(data_path="dataloader", **cfg), CPU)
    device = data_mod.build(cfg_for(data_path="device", **cfg), CPU)
    assert device.resize == device_data.RESIZE_NOTES["device-batch"]
    assert device.train.images.shape[-1] == device.test.images.shape[-1] == 32
    for (xr, yr), (xg, yg) in zip(loader.train, device.train, strict=True):
        assert xg.shape[-1] == image_size
        assert torch.equal(yr, yg) and torch.equal(xr, xg)
    xr, yr = map(torch.cat, zip(*loader.test))
    xg, yg = map(torch.cat, zip(*device.test))
    assert torch.equal(yr, yg) and torch.equal(xr, xg)


def mixed_size_image_folder(root):
    written = make_image_folder(root, per_class={"train": 2, "test": 1}, size=(20, 24))
    odd = written["train"][3]  # one image of another size, as an ImageFolder may hold
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(odd)


def test_device_data_path_resizes_images_of_mixed_sizes_like_the_dataloader(tmp_path):
    mixed_size_image_folder(tmp_path)
    cfg = dict(dataset="imagefolder", data_dir=tmp_path, image_size=33, batch_size=8)
    loader = data_mod.build(cfg_for(data_path="dataloader", **cfg), CPU)
    device = data_mod.build(cfg_for(data_path="device", **cfg), CPU)
    assert device.resize == device_data.RESIZE_NOTES["device-once"]
    for (xr, yr), (xg, yg) in zip(loader.train, device.train, strict=True):
        assert torch.equal(xr, xg) and torch.equal(yr, yg)
    xr, yr = map(torch.cat, zip(*loader.test))
    xg, yg = map(torch.cat, zip(*device.test))
    assert torch.equal(yr, yg) and torch.equal(xr, xg)


def test_device_data_path_refuses_mixed_size_images_that_do_not_fit_with_a_one_line_error(
        tmp_path, monkeypatch):
    mixed_size_image_folder(tmp_path)
    monkeypatch.setattr(device_data, "_free_bytes", lambda device: 0)
    cfg = dict(dataset="imagefolder", data_dir=tmp_path, image_size=33, data_path="device")
    with pytest.raises(data_mod.DataError) as excinfo:
        data_mod.build(cfg_for(**cfg), CPU)
    message = str(excinfo.value)
    assert message.startswith("data_path:") and "data_path=dataloader" in message
    assert "\n" not in message


def splits(data: data_mod.Data) -> list[torch.Tensor]:
    return [data.train.images, data.train.targets, data.test.images, data.test.targets]


def test_inside_keep_prepared_a_second_run_with_the_same_data_reads_the_same_tensors():
    cfg = cfg_for(data_path="device", image_size=36)
    fresh = data_mod.build(cfg, CPU)
    assert not fresh.reused and device_data._kept is None  # a run on its own keeps nothing
    with device_data.keep_prepared():
        first = data_mod.build(cfg, CPU)
        second = data_mod.build(dataclasses.replace(cfg, skip=True, model="resnet18"), CPU)
    assert not first.reused and second.reused
    for a, b, c in zip(splits(first), splits(second), splits(fresh), strict=True):
        assert a is b                # not prepared again
        assert torch.equal(a, c)     # and what a fresh preparation gives
    assert second.resize == fresh.resize
    assert device_data._kept is None


def test_a_run_with_other_data_drops_the_kept_split_before_preparing_its_own():
    cfg = cfg_for(data_path="device", image_size=36)
    with device_data.keep_prepared():
        first = data_mod.build(cfg, CPU)
        kept = weakref.ref(first.train.images)
        del first
        other = data_mod.build(dataclasses.replace(cfg, image_size=40), CPU)
        assert not other.reused and other.train.images.shape[-1] == 40
        gc.collect()
        assert kept() is None  # device memory never holds both sets
    assert device_data._kept is None


def test_a_changed_test_sample_is_prepared_again_while_the_training_split_is_reused(tmp_path):
    # A smoke run (max_steps) tests on a seeded sample of the test split: another seed,
    # other images, although the folder is the same.
    make_image_folder(tmp_path, per_class={"train": 2, "test": 2}, size=(20, 24))
    cfg = cfg_for(dataset="imagefolder", data_dir=tmp_path, data_path="device", max_steps=1,
                  batch_size=4, seed=1)
    with device_data.keep_prepared():
        first = data_mod.build(cfg, CPU)
        second = data_mod.build(dataclasses.replace(cfg, seed=2), CPU)
    fresh = data_mod.build(dataclasses.replace(cfg, seed=2), CPU)
    assert second.train.images is first.train.images
    assert not second.reused  # the tag speaks for both splits
    assert not torch.equal(second.test.targets, first.test.targets)
    assert torch.equal(second.test.images, fresh.test.images)
    assert torch.equal(second.test.targets, fresh.test.targets)


@needs_cuda
def test_pil_resize_on_the_gpu_equals_pils_resize_bit_for_bit():
    # The GPU's float64 GEMM may sum in any order; exact all the same (data.pil_resize).
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3),
                                                                 dtype=np.uint8))
    for size in (224, 36, 112, 17):
        want = torch.stack([pil_to_tensor(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                            for im in images.numpy()])
        got = resize.pil_resize(images.permute(0, 3, 1, 2).contiguous().cuda(), size)
        assert torch.equal(got.cpu(), want), size


def test_auto_data_path_is_the_dataloader_on_the_cpu():
    assert data_mod.build(cfg_for(), CPU).path == "dataloader"


def test_fast_data_path_trains_to_bitwise_equal_losses_and_norms_over_five_epochs(tracking_store):
    """train.run end to end, on the CPU: the only difference is the data path. 53 images in
    batches of 16 are 3 full batches and a partial one per epoch, reshuffled each epoch, and
    resized 32 -> 36 px; 20 steps are 5 epochs of them, flushed in chunks of 7. The network
    only has to consume the batches: resnet18 (the data path is the same for any model)."""
    from mlflow import MlflowClient

    from pipeline import train

    common = dict(dataset="synthetic", synthetic_size=16 * 3 + 5, synthetic_test_size=16,
                  image_size=36, batch_size=16, max_steps=20, epochs=20, flush_every=7,
                  model="resnet18", num_workers=0, log_model="false",
                  log_system_metrics="false", device="cpu")
    ids = {p: train.run(Config.from_strings({**{k: str(v) for k, v in common.items()},
                                              "data_path": p}))
           for p in ("dataloader", "device")}
    client = MlflowClient()
    layers = client.get_run(ids["device"]).data.tags[names.LAYERS_RESOLVED_TAG].split(",")
    assert len(layers) == 5
    for key in [names.TRAIN_LOSS] + [names.grad_norm(layer) for layer in layers]:
        series = {p: [(m.step, m.value) for m in sorted(client.get_metric_history(i, key),
                                                         key=lambda m: m.step)]
                  for p, i in ids.items()}
        assert len(series["device"]) == 20
        assert series["device"] == series["dataloader"], key
    assert client.get_run(ids["device"]).data.tags[names.DATA_PATH_TAG] == "device"


# --- the step -------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_eager_step_trains_exactly_like_a_hand_written_loop():
    batches = [(torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(i)),
                torch.arange(5) % 10) for i in range(4)]
    torch.manual_seed(0)
    ours, theirs = Small(), Small()
    theirs.load_state_dict(ours.state_dict())

    probes = GradientProbes(ours, ("conv", "fc"), flush_every=10, device=CPU)
    step = engine.Step(ours, engine.make_optimizer("adam", ours.parameters(), 1e-3, False),
                       probes, contextlib.nullcontext, CPU, graph=False)
    assert engine.run_steps(step, batches, CPU, probes) == (4, 20)

    opt = torch.optim.Adam(theirs.parameters(), lr=1e-3, fused=True)
    losses, correct = [], 0
    for x, y in batches:
        opt.zero_grad()
        out = theirs(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        correct += (out.argmax(1) == y).sum().item()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert probes.drain().values()[:, -1].tolist() == pytest.approx(losses, rel=0, abs=0)
    assert step.correct.item() == correct
    probes.remove()


def bf16_run(cast_once: bool, batch_norm: bool, channels_last: bool):
    """Four bf16-autocast steps of a seeded resnet18 with output and weight probes; returns
    (probe rows, weights, step)."""
    torch.manual_seed(0)
    model = build_model("resnet18", skip=True, batch_norm=batch_norm)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    probes = GradientProbes(model, ("conv1", "layer1.0.conv1", "fc"), 10, CPU, weights=True)
    step = engine.Step(model, engine.make_optimizer("adam", model.parameters(), 1e-3, False),
                       probes, engine.autocast_for("bf16", CPU), CPU, graph=False,
                       channels_last=channels_last, cast_once=cast_once)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(3)]
    engine.run_steps(step, batches, CPU, probes)
    # A fourth step the way a partial batch runs beside a CUDA graph: the gradients zeroed
    # in place (the graph holds them), not set to None.
    step._zero_grad(set_to_none=False)
    x, y = batches[0]
    step._body(x.contiguous(memory_format=torch.channels_last) if channels_last else x, y)
    probes.advance()
    rows = probes.drain().values()
    probes.remove()
    return rows, [p.detach().clone() for p in model.parameters()], step


def test_a_bf16_run_without_a_graph_lets_autocast_cast_per_op_and_tags_it(tracking_store):
    from mlflow import MlflowClient

    from pipeline import train

    run_id = train.run(cfg_for(model="resnet18", precision="bf16", max_steps=2,
                               log_model="false", log_system_metrics="false"))
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[names.GRAPH_TAG] == "eager" and tags[names.WEIGHT_CASTS_TAG] == "per-op"


@pytest.mark.parametrize("batch_norm, channels_last", [(False, False), (False, True), (True, False)])
def test_bf16_weights_cast_once_per_step_train_exactly_like_autocasts_per_op_casts(
        batch_norm, channels_last):
    ours_rows, ours_weights, ours = bf16_run(True, batch_norm, channels_last)
    ref_rows, ref_weights, _ = bf16_run(False, batch_norm, channels_last)
    # Only convolutions and linear layers get copies: BatchNorm runs on float32 weights.
    cast = {id(p) for p in ours.cast.params}
    assert all(id(p) in cast for m in ours.model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert not any(id(p) in cast for m in ours.model.modules()
                   if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert (ours_rows[:, 4:] > 0).all()  # the weight probes read the float32 gradients
    assert np.array_equal(ours_rows, ref_rows)
    for a, b in zip(ours_weights, ref_weights):
        assert torch.equal(a, b)


class Reused(nn.Module):
    """A linear layer called twice per forward, and a convolution never called."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.mix = nn.Linear(4 * 8 * 8, 4 * 8 * 8)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(self.mix(torch.relu(self.mix(h))))


def test_cast_once_leaves_a_module_called_twice_and_an_unused_one_to_autocast():
    # One bf16 copy of a twice-used weight would add its two gradients in bf16, where
    # autocast adds them in float32: not the same numbers. An unused one costs a copy.
    def run(cast_once):
        torch.manual_seed(0)
        model = Reused()
        step = engine.Step(model, engine.make_optimizer("adam", model.parameters(), 1e-3, False),
                           None, engine.autocast_for("bf16", CPU), CPU, graph=False,
                           cast_once=cast_once)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            step(torch.rand(5, 3, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g))
            losses.append(step.loss.item())
        return losses, [p.detach().clone() for p in model.parameters()], step

    ours_losses, ours_weights, ours = run(True)
    ref_losses, ref_weights, _ = run(False)
    model = ours.model
    assert {id(p) for p in ours.cast.params} == {id(p) for p in (
        model.conv.weight, model.conv.bias, model.fc.weight, model.fc.bias)}
    assert ours_losses == ref_losses
    for a, b in zip(ours_weights, ref_weights):
        assert torch.equal(a, b)


def adam_weights_after(steps: int, fused: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(weights before, weights after ``steps`` Adam steps) of a seeded resnet18."""
    torch.manual_seed(0)
    model = build_model("resnet18", skip=True)
    before = [p.detach().numpy().copy() for p in model.parameters()]
    optimizer = engine.make_optimizer("adam", model.parameters(), 1e-3, False, fused=fused)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return before, [p.detach().numpy().copy() for p in model.parameters()]


def test_fused_adams_first_step_agrees_with_the_for_loop_adams_to_rounding():
    # Same update formula, other rounding. Two sources, each bounded:
    # * w - update rounds at w's scale: one float32 ulp of the larger of w before and after;
    # * the update (~lr = 1e-3) itself: the fused kernel computes the bias correction
    #   1 - beta2**t in float32, where 1 - 0.999 carries a 1.3e-5 relative error (so does the
    #   capturable Adam a CUDA graph needs); sqrt halves it, so 1e-5 * lr bounds it.
    before, fused = adam_weights_after(1, fused=True)
    _, loop = adam_weights_after(1, fused=False)
    moved = 0
    for w, a, b in zip(before, fused, loop):
        scale = np.maximum(np.abs(w), np.maximum(np.abs(a), np.abs(b)))
        assert (np.abs(a - b) <= np.spacing(scale) + 1e-5 * 1e-3).all()
        moved += int((a != b).sum())
    assert moved > 0  # they do differ somewhere: the bound is not vacuous


def test_a_resumed_optimizer_keeps_its_own_implementation_options_not_the_checkpoints(tmp_path):
    # A checkpoint from the for-loop Adam (capturable=False, fused=None), resumed into the
    # fused one: the file gives the state, the resuming optimizer keeps its implementation.
    from pipeline import checkpoint

    torch.manual_seed(0)
    model = Small()
    old = engine.make_optimizer("adam", model.parameters(), 1e-3, False, fused=False)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    old.step()
    path = checkpoint.save(tmp_path / "last.pt", model, old,
                           checkpoint.Position(1, 0, 1, torch.zeros(2)), {})
    new = engine.make_optimizer("adam", model.parameters(), 1e-3, False)
    checkpoint.load(path, model, new, CPU)
    assert [g["fused"] for g in new.param_groups] == [True]
    state = new.state[next(model.parameters())]
    assert float(state["step"]) == 1.0 and torch.equal(
        state["exp_avg"], old.state[next(model.parameters())]["exp_avg"])
    new.step()  # the fused kernel accepts the restored state
    assert float(new.state[next(model.parameters())]["step"]) == 2.0


def test_a_graph_asked_for_on_the_cpu_runs_eagerly_and_says_why():
    model = Small()
    step = engine.Step(model, engine.make_optimizer("adam", model.parameters(), 1e-3, False),
                       None, contextlib.nullcontext, CPU, graph=True)
    step(torch.rand(2, 3, 8, 8), torch.tensor([1, 2]))
    assert step.status.mode == "eager"
    assert "CUDA" in step.status.reason


def test_the_graph_waits_for_a_full_batch_instead_of_capturing_a_partial_first_one():
    # A run resumed just before an epoch's partial batch starts with it: capturing that
    # shape would run every full batch after it eagerly.
    model = Small()
    step = engine.Step(model, engine.make_optimizer("adam", model.parameters(), 1e-3, False),
                       None, contextlib.nullcontext, CPU, graph=True, graph_batch=4)
    step(torch.rand(2, 3, 8, 8), torch.tensor([1, 2]))
    assert step.capture_pending and step.status.reason == engine.Step.PENDING
    assert step.eager_batches == 1
    step(torch.rand(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))  # tried now (and, on a CPU, refused)
    assert not step.capture_pending and "CUDA" in step.status.reason


def test_graph_on_without_cuda_is_refused_in_one_line_before_any_data_work(tmp_path):
    proc = run_pipeline(["train", "--graph", "on", "--device", "cpu", "--dataset", "cifar10",
                         "--data-dir", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert proc.returncode == 2, describe_process(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: graph:") and "auto, off" in lines[0]
    assert not (tmp_path / "nowhere").exists()  # nothing downloaded


# --- GPU: the graph equals the eager step, and never syncs -----------------------------------
@contextlib.contextmanager
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def engine_run(*, graph: bool, capturable: bool, steps: int = 50, precision: str = "default",
               channels_last: bool = True, deterministic: bool = True, data_path: str = "device",
               image_size: int = 64, images: int = 16 * 7 + 5, fused: bool = True,
               weights: bool = False):
    """``steps`` training steps as train.run drives them; returns (rows, weights, step)."""
    device = torch.device("cuda")
    data = data_mod.build(cfg_for(image_size=image_size, batch_size=16, synthetic_size=images,
                                  data_path=data_path, device="cuda"), device)
    torch.manual_seed(0)
    model = build_model("resnet50", skip=False).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    chunks = []
    with precision_mode(precision, device) as autocast, \
            (deterministic_cudnn() if deterministic else contextlib.nullcontext()):
        optimizer = engine.make_optimizer("adam", model.parameters(), 1e-3, capturable, fused)
        probes = GradientProbes(model, DEFAULT_LAYERS, steps, device, weights=weights)
        step = engine.Step(model, optimizer, probes, autocast, device, graph=graph,
                           channels_last=channels_last,
                           cast_once=engine.casts_weights_once(precision, graph), graph_batch=16)
        done = 0
        while done < steps:
            n, _ = engine.run_steps(step, data.train, device, probes, chunks.append,
                                    limit=steps - done)
            done += n
        chunks.append(probes.drain())
        probes.remove()
    rows = np.concatenate([c.values() for c in chunks if c is not None])
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return rows, weights, step


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@needs_cuda
@pytest.mark.parametrize("precision", ["default", "bf16"])
def test_cuda_graph_step_equals_the_eager_step_exactly_over_50_steps(precision):
    # In bf16 the graph also casts the weights once per step (engine.Bf16Weights) and the
    # eager step per op, as train.run does: that too must change nothing.
    graph_rows, graph_w, graph_step = engine_run(graph=True, capturable=True, precision=precision)
    eager_rows, eager_w, _ = engine_run(graph=False, capturable=True, precision=precision)
    assert graph_step.status.mode == "graph", graph_step.status.reason
    assert graph_step.eager_batches > 0  # the partial batch of each epoch ran eagerly
    assert graph_rows.shape == (50, len(DEFAULT_LAYERS) + 1)
    report(f"graph_vs_eager_{precision}", {
        "max_relative_difference_norms_and_losses": relative_difference(graph_rows, eager_rows),
        "eager_batches_beside_graph": graph_step.eager_batches})
    assert np.array_equal(graph_rows, eager_rows)
    for k in eager_w:
        assert torch.equal(graph_w[k], eager_w[k]), k


@needs_cuda
@pytest.mark.parametrize("precision", ["default", "bf16"])
def test_weight_gradient_probes_in_the_cuda_graph_equal_the_eager_steps_exactly(precision):
    # probe=both: the output and weight gradients share one grouped reduction, captured; in
    # bf16 the graph's weight gradients come through the copies' (engine.Bf16Weights).
    graph_rows, _, graph_step = engine_run(graph=True, capturable=True, steps=20, weights=True,
                                           precision=precision)
    eager_rows, _, _ = engine_run(graph=False, capturable=True, steps=20, weights=True,
                                  precision=precision)
    assert graph_step.status.mode == "graph", graph_step.status.reason
    assert graph_rows.shape == (20, 2 * len(DEFAULT_LAYERS) + 1)
    assert (graph_rows[:, len(DEFAULT_LAYERS) + 1:] > 0).all()  # weight norms were recorded
    report(f"graph_vs_eager_weight_probes_{precision}",
           {"max_relative_difference": relative_difference(graph_rows, eager_rows)})
    assert np.array_equal(graph_rows, eager_rows)


@needs_cuda
def test_fast_default_path_stays_close_to_the_notebooks_eager_loop_over_50_steps():
    """Everything the fast path changes at once, with PyTorch's default (TF32) numerics and
    cuDNN's default (non-deterministic) algorithms: device data, graph, capturable fused Adam
    (the notebook's is the for-loop/foreach one), channels_last.

    Exact equality is impossible here (the graph itself adds nothing: the test above shows
    it is exact). channels_last picks other cuDNN algorithms, and TF32 rounds each product
    to a 10-bit mantissa (~5e-4 relative), so step 0's norms differ at that level: 7.3e-4
    measured on an H200 (with cudnn.benchmark on, at the time). Adam then turns those
    differences into slightly different weights, and later norms of the tiny early-layer
    gradients differ by up to 1.6% after 50 steps; the losses sit at ln(10) and differ by
    2e-7. Tolerances, with headroom: step 0 norms 5e-3, losses 1e-4, all norms 5e-2
    (relative).
    """
    fast, _, _ = engine_run(graph=True, capturable=True, deterministic=False)
    ref, _, _ = engine_run(graph=False, capturable=False, channels_last=False,
                           deterministic=False, data_path="dataloader", fused=False)
    diff = {"norms": relative_difference(fast[:, :-1], ref[:, :-1]),
            "losses": relative_difference(fast[:, -1], ref[:, -1]),
            "step0_norms": relative_difference(fast[0, :-1], ref[0, :-1])}
    report("fast_vs_notebook_eager", diff)
    assert diff["step0_norms"] < 5e-3 and diff["losses"] < 1e-4 and diff["norms"] < 5e-2, diff


@needs_cuda
@pytest.mark.parametrize("precision", ["default", "bf16"])
def test_a_steady_state_step_never_synchronises_the_host(precision):
    device = torch.device("cuda")
    data = data_mod.build(cfg_for(image_size=64, batch_size=16, synthetic_size=16 * 40,
                                  data_path="device", device="cuda"), device)
    torch.manual_seed(0)
    model = build_model("resnet50", skip=False).to(device).to(memory_format=torch.channels_last)
    chunks = []
    with precision_mode(precision, device) as autocast:
        probes = GradientProbes(model, DEFAULT_LAYERS, 8, device)
        step = engine.Step(model, engine.make_optimizer("adam", model.parameters(), 1e-3, True),
                           probes, autocast, device, graph=True, channels_last=True,
                           cast_once=engine.casts_weights_once(precision, True))
        batches = iter(data.train)
        engine.run_steps(step, itertools.islice(batches, 5), device, probes, chunks.append)
        assert step.status.mode == "graph", step.status.reason
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
        try:
            # 20 steps: two full readbacks of 8 rows (pinned, non-blocking copies) included.
            engine.run_steps(step, itertools.islice(batches, 20), device, probes, chunks.append)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        probes.remove()
    assert sum(c is not None for c in chunks) >= 3
    values = np.concatenate([c.values() for c in chunks if c is not None])
    assert values.shape[0] == 24 and np.isfinite(values).all()


class SyncsOnTheHost(nn.Module):
    """A forward pass that reads a device value on the host, which a capture refuses."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv1(x).relu()
        if x.sum() > 0:  # .item(): a host sync
            x = x * 1
        return self.fc(x.mean((2, 3)))


@needs_cuda
def test_a_step_that_cannot_be_captured_falls_back_to_eager_with_the_reason_on_the_callers_stream():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SyncsOnTheHost().to(device)
    reference = SyncsOnTheHost().to(device)
    reference.load_state_dict(model.state_dict())
    x = torch.rand(8, 3, 16, 16, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    steps = {}
    for name, net, graph in (("fallback", model, True), ("eager", reference, False)):
        step = engine.Step(net, engine.make_optimizer("adam", net.parameters(), 1e-3, True),
                           None, contextlib.nullcontext, device, graph=graph)
        stream = torch.cuda.current_stream()
        losses = []
        for _ in range(4):
            step(x, y)
            losses.append(step.loss.clone())
        assert torch.cuda.current_stream() == stream
        steps[name] = (step, torch.stack(losses))
    status = steps["fallback"][0].status
    assert status.mode == "eager" and status.reason.startswith("capture failed"), status
    # Warm-up undone: the fallback trained exactly the steps the eager run did.
    assert torch.equal(steps["fallback"][1], steps["eager"][1])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


@needs_cuda
def test_train_run_on_cuda_captures_the_step_and_tags_how(tracking_store):
    from mlflow import MlflowClient

    from pipeline import train

    run_id = train.run(cfg_for(image_size=64, batch_size=16, synthetic_size=16 * 4 + 3,
                               max_steps=12, epochs=3, log_model="false", device="cuda"))
    run = MlflowClient().get_run(run_id)
    tags = run.data.tags
    assert tags[names.GRAPH_TAG] == "graph", tags[names.GRAPH_REASON_TAG]
    assert tags[names.DATA_PATH_TAG] == "device" and tags[names.CHANNELS_LAST_TAG] == "true"
    assert tags[names.WEIGHT_CASTS_TAG] == "none"  # TF32: no bf16 casts
    assert tags[names.EAGER_STEPS_TAG] == "2"  # the partial last batch of epochs 1 and 2
    history = MlflowClient().get_metric_history(run_id, names.grad_norm("conv1"))
    assert sorted(m.step for m in history) == list(range(12))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_model_trained_channels_last_is_logged_without_warnings_and_loads_back_on_the_cpu(
        tracking_store, device, monkeypatch):
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow import MlflowClient

    from pipeline import train

    # Any convolutional network trained channels_last shows it; resnet18 exports fastest.
    cfg = cfg_for(image_size=32, batch_size=4, synthetic_size=8, max_steps=2, epochs=1,
                  log_model="true", channels_last="true", device=device, model="resnet18")
    # MLflow checks the input example by loading the model back, on CUDA where a GPU is
    # visible; on an H200 that failed with a WARNING (the CPU-exported program refuses
    # CUDA). Asking MLflow for CUDA predictions makes a CPU machine take that same path.
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cuda")
    warned = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("mlflow").addHandler(handler)
    try:
        run_id = train.run(cfg)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not [w for w in warned if "input example" in w], warned
    assert os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] == "cuda"  # the user's, back
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    uri = f"runs:/{run_id}/{names.MODEL}"
    loaded = mlflow.pytorch.load_model(uri)
    out = loaded(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 10) and out.device.type == "cpu"
    # As a pyfunc (what `mlflow models serve` loads), on this machine's CPU; README says
    # why a GPU machine must ask for it.
    pyfunc = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    assert pyfunc.predict(np.random.rand(3, 3, 32, 32).astype(np.float32)).shape == (3, 10)
