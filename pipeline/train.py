"""The training loop: the founding notebook's experiment, probed every step, logged to MLflow.

``run(cfg)`` is the one code path behind ``mlflow run .`` and ``python -m pipeline train``.
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from torch import nn

from . import code_version, engine, names, plots
from . import data as data_mod
from .config import Config, ConfigError
from .models import build_model
from .probes import FLUSH_SECONDS, GradientProbes, check_layers
from .progress import Progress
from .tracking import Tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is visible; "
                                    "allowed here: auto, cpu")
    return torch.device(name)


def resolve_graph(cfg: Config, device: torch.device) -> bool:
    if cfg.graph == "on" and device.type != "cuda":
        raise ConfigError("graph", f"on needs a CUDA device, and this run uses {device.type}; "
                                   "allowed here: auto, off")
    return cfg.graph == "on" or (cfg.graph == "auto" and device.type == "cuda")


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """Yield an autocast factory for the forward pass; restore global flags afterwards.

    ``default`` leaves PyTorch alone, which on Ampere and newer runs fp32 convolutions as
    TF32, as the notebook ran. ``fp32`` turns TF32 off (strict IEEE; ~2.5x slower on H200,
    measurements.md). ``bf16`` autocasts; norms are still reduced in float64.
    cudnn.benchmark stays off: on an H200 it bought nothing here (5.73 against 5.74 ms per
    step, BENCHMARKS.md) and would make the algorithm choice, hence the last bits of every
    norm, vary from run to run.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield engine.autocast_for(precision, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def describe(cfg: Config, source: str) -> str:
    skip = "with skip connections" if cfg.skip else "without skip connections (the notebook's run)"
    return (f"**{cfg.model}** (no BatchNorm) {skip}, trained for {cfg.epochs} epoch(s) on "
            f"{source} at {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr}, seed {cfg.seed}"
            + (f", stopped after {cfg.max_steps} batches" if cfg.max_steps else "") + ".\n\n"
            f"Every batch logs `grad_norm/<layer>`: the float64 L2 norm of dLoss/d(layer output) "
            f"for {', '.join(f'`{layer}`' for layer in cfg.layers)}.")


def result_table(gradients: dict[str, list[float]]) -> str:
    rows = ["| layer | median | min | max | last | zero steps |", "|---|---:|---:|---:|---:|---:|"]
    for layer, values in gradients.items():
        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            continue
        rows.append(f"| `{layer}` | {np.median(v):.3g} | {v.min():.3g} | {v.max():.3g} | "
                    f"{v[-1]:.3g} | {(v == 0).mean():.0%} |")
    return "\n".join(rows)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast):
    """Mean loss and accuracy on the test split; one host sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    model.train()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def run(cfg: Config, tags: dict[str, str] | None = None) -> str:
    """Train one variant and log it; returns the MLflow run ID. ``tags`` are added to the run."""
    # --- 1. check everything cheap before any download or device work -----------------
    device = resolve_device(cfg.device)
    use_graph = resolve_graph(cfg, device)
    torch.manual_seed(cfg.seed)  # the init draws, in the notebook's module order
    model = build_model(cfg.model, skip=cfg.skip)
    check_layers(model, cfg.layers, cfg.image_size)

    # --- 2. data (may download) ---------------------------------------------------------
    data = data_mod.build(cfg, device)

    # --- 3. the MLflow run --------------------------------------------------------------
    tracker = Tracker.start(cfg.run_name, cfg.to_params(), {
        names.VARIANT_TAG: cfg.variant, names.MODEL_TAG: cfg.model,
        names.DEVICE_TAG: str(device), names.STEPS_PER_EPOCH_TAG: str(data.steps_per_epoch),
        names.DATA_PATH_TAG: data.path, names.DATA_RESIZE_TAG: data.resize,
        names.CODE_VERSION_TAG: code_version(), **(tags or {}),
    }, system_metrics=cfg.wants_system_metrics(device.type))
    tracker.set_note(describe(cfg, data.source))
    with tracker.ending(), precision_mode(cfg.precision, device) as autocast:
        # What reproduces this run: the resolved configuration and the software it ran on.
        tracker.log_dict({"params": cfg.to_params(), "code_version": code_version()},
                         names.CONFIG_JSON)
        tracker.set_tags(environment(device))
        tracker.log_datasets(data.lineage)
        gradients, summary = _train(cfg, model, data, device, autocast, tracker, use_graph)
        _log_artifacts(cfg, tracker, gradients, summary, data)
        if cfg.wants_model:
            _log_model(cfg, tracker, model, device)
    return tracker.run_id


def environment(device: torch.device) -> dict[str, str]:
    """Versions and numeric settings that can change results, as ``env.*`` tags."""
    import mlflow
    import torchvision

    cuda = device.type == "cuda"
    return {
        "env.torch": torch.__version__, "env.torchvision": torchvision.__version__,
        "env.mlflow": mlflow.__version__, "env.cuda": str(torch.version.cuda),
        "env.cudnn": str(torch.backends.cudnn.version()),
        "env.gpu": torch.cuda.get_device_name(device) if cuda else "none",
        "env.cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32).lower(),
        "env.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32).lower(),
        "env.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env.cpu_threads": str(torch.get_num_threads()),
    }


def _log_model(cfg: Config, tracker: Tracker, model: nn.Module, device: torch.device) -> None:
    # Exported on the CPU in the default layout: torch.export traces with the input
    # example, which MLflow turns into CPU tensors, and a loaded model should run anywhere.
    # The run is over, so moving the trained model costs nothing else.
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    # A fixed, seeded example of batch 2 (see tracking.log_model for why not 1).
    example = torch.rand(2, 3, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        output = model(example)
    tracker.log_model(model, example.numpy(), output.numpy(), cfg.registered_name)


def _train(cfg, model, data, device, autocast, tracker, use_graph):
    channels_last = cfg.wants_channels_last(device.type)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = engine.make_optimizer(cfg.optimizer, model.parameters(), cfg.lr,
                                      capturable=use_graph)
    steps_per_epoch = data.steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    # The buffer never needs more rows than the run has steps.
    probes = GradientProbes(model, cfg.layers, min(cfg.flush_every, total), device,
                            flush_seconds=FLUSH_SECONDS)
    step_fn = engine.Step(model, optimizer, probes, autocast, device, graph=use_graph,
                          channels_last=channels_last)
    keys = [names.grad_norm(layer) for layer in cfg.layers] + [names.TRAIN_LOSS]
    progress = Progress(cfg.epochs, steps_per_epoch, cfg.batch_size, total,
                        estimate=device.type == "cpu")
    tracker.stream(keys, on_values=progress.on_values)

    step, summary = 0, {}

    def on_step(i):  # i counts from 0 within the epoch; ``step`` is read at call time
        if step + i == 0:
            _log_engine(tracker, step_fn, channels_last, progress)
        progress.step(step + i)

    try:
        for epoch in range(cfg.epochs):
            progress.start_epoch(epoch)
            t0 = time.perf_counter()
            step_fn.correct.zero_()
            limit = cfg.max_steps - step if cfg.max_steps else None
            done, seen = engine.run_steps(step_fn, data.train, device, probes, tracker.submit,
                                          on_step, limit)
            step += done
            tracker.submit(probes.drain())
            if device.type == "cuda":
                torch.cuda.synchronize()  # once per epoch, so the timing below is honest
            train_seconds = time.perf_counter() - t0
            test_loss, test_acc = evaluate(model, data.test, device, autocast)
            summary = {
                names.TRAIN_ACCURACY: step_fn.correct.item() / max(seen, 1),
                names.TEST_ACCURACY: test_acc,
                names.TEST_LOSS: test_loss,
                names.EPOCH_SECONDS: time.perf_counter() - t0,
                names.IMAGES_PER_SECOND: seen / max(train_seconds, 1e-9),
            }
            tracker.log_epoch(epoch, summary, int(time.time() * 1000))
            progress.end_epoch(
                f"loss {progress.loss_text} train acc {summary[names.TRAIN_ACCURACY]:.3f} "
                f"test acc {test_acc:.3f} test loss {test_loss:.4f} "
                f"({summary[names.IMAGES_PER_SECOND]:.0f} img/s)")
            if cfg.max_steps and step >= cfg.max_steps:
                break
    finally:
        progress.close()
        probes.remove()

    tracker.set_tags({names.EAGER_STEPS_TAG: str(step_fn.eager_batches)})
    series = tracker.flush()
    gradients = {layer: [v for _, v in sorted(series.get(names.grad_norm(layer), []))]
                 for layer in cfg.layers}
    summary["steps"] = step
    return gradients, summary


def _log_engine(tracker: Tracker, step_fn: engine.Step, channels_last: bool,
                progress: Progress) -> None:
    """What the first step turned out to be (captured, or eager and why); said once."""
    status = step_fn.status
    tracker.set_tags({names.GRAPH_TAG: status.mode, names.GRAPH_REASON_TAG: status.reason,
                      names.CHANNELS_LAST_TAG: str(channels_last).lower()})
    if status.mode == "eager" and step_fn.want_graph:
        progress.write(f"note: CUDA graph not used ({status.reason}); training eagerly")


def _log_artifacts(cfg, tracker, gradients, summary, data) -> None:
    tracker.log_dict(gradients, names.GRADIENTS_JSON)
    variant = "with skip connections" if cfg.skip else "without skip connections"
    fig = plots.gradient_norms(
        gradients, f"Gradient norms - {cfg.model} ({variant}), {cfg.dataset} "
                   f"{cfg.image_size}px, {cfg.optimizer} lr {cfg.lr}",
        batches_per_epoch=data.steps_per_epoch)
    try:
        tracker.log_figure(fig, names.GRADIENT_PLOT)
    finally:
        plots.close(fig)
    acc = summary.get(names.TEST_ACCURACY, math.nan)
    tracker.set_note(describe(cfg, data.source) + "\n\n"
                     f"**Result** after {summary['steps']} batches: test accuracy {acc:.3f}.\n\n"
                     + result_table(gradients))
