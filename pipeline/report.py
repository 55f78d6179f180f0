"""What a training run leaves behind besides its metrics: its description, gradients.json and
the plots, gradients/norms.npz with the diagnosis tags, the setup that reproduces it, and the
exported model."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch
from torch import nn

from . import code_version, gradient_flow, health, names, plots, report_html
from .config import Config
from .data import NUM_CLASSES
from .devices import environment


def log_setup(tracker, plan, data) -> None:
    """What reproduces the run: its resolved configuration, the software it ran on (read
    inside ``devices.precision_mode``), and its datasets."""
    tracker.log_dict({"params": plan.params, "code_version": code_version()}, names.CONFIG_JSON)
    tracker.set_tags(environment(plan.device))
    tracker.log_datasets(data.lineage)


def describe(cfg: Config, source: str) -> str:
    notebooks = cfg.model == "resnet50" and not cfg.batch_norm and cfg.init == "pytorch"
    skip = ("with skip connections" if cfg.skip else "without skip connections"
            + (" (the notebook's run)" if notebooks else ""))
    norm = "with BatchNorm" if cfg.batch_norm else "no BatchNorm"
    return (f"**{cfg.model}** ({norm}, {cfg.init} init) {skip}, trained for {cfg.epochs} "
            f"epoch(s) on {source} at {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr}, seed {cfg.seed}"
            + (f", stopped after {cfg.max_steps} batches" if cfg.max_steps else "") + ".\n\n"
            "Every batch logs `grad_norm/<layer>`: the float64 L2 norm of dLoss/d(layer output) "
            + (f"for {', '.join(f'`{layer}`' for layer in cfg.layers)}." if len(cfg.layers) <= 10
               else f"for the layers in the `{names.METRIC_LAYERS_TAG}` tag, and every "
                    f"{cfg.metric_every} batches for the rest of the {len(cfg.layers)} probed "
                    f"layers (`{names.LAYERS_RESOLVED_TAG}`)")
            + f" `{names.NORMS_NPZ}` has every probed layer at every batch.")


def result_table(gradients: dict[str, list[float]]) -> str:
    rows = ["| layer | median | min | max | last | zero steps |", "|---|---:|---:|---:|---:|---:|"]
    for layer, values in gradients.items():
        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            continue
        rows.append(f"| `{layer}` | {np.median(v):.3g} | {v.min():.3g} | {v.max():.3g} | "
                    f"{v[-1]:.3g} | {(v == 0).mean():.0%} |")
    return "\n".join(rows)


def log_gradients(tracker, gradients: dict[str, list[float]], title: str,
                  steps_per_epoch: int | None = None, outputs: bool = True) -> None:
    """gradients/gradients.json (the notebook's shape) and its plot, plots/gradient_norms.png."""
    tracker.log_dict(gradients, names.GRADIENTS_JSON)
    fig = plots.gradient_norms(gradients, f"Gradient norms - {title}",
                               batches_per_epoch=steps_per_epoch,
                               quantity="dLoss/d(layer output)" if outputs
                               else "dLoss/d(layer weights)")
    try:
        tracker.log_figure(fig, names.GRADIENT_PLOT)
    finally:
        plots.close(fig)


def log_results(cfg: Config, tracker, gradients: dict[str, list[float]], summary: dict,
                data) -> None:
    """gradients.json, its plot and the run's description with its result."""
    log_gradients(tracker, gradients, f"{title(cfg)}, {cfg.optimizer} lr {cfg.lr}",
                  data.steps_per_epoch, cfg.probes_outputs)
    acc = summary.get(names.TEST_ACCURACY, math.nan)
    tracker.set_note(describe(cfg, data.source) + "\n\n"
                     f"**Result** after {summary['steps']} batches: test accuracy {acc:.3f}.\n\n"
                     + result_table(gradients), (names.GRADIENTS_JSON, names.NORMS_NPZ))


def title(cfg: Config) -> str:
    variant = "with skip connections" if cfg.skip else "without skip connections"
    return f"{cfg.model} ({variant}), {cfg.dataset} {cfg.image_size}px"


def log_gradient_flow(tracker, dense: dict[str, np.ndarray], title: str,
                      steps_per_epoch: int | None = None,
                      num_classes: int | None = NUM_CLASSES) -> dict[str, str]:
    """gradients/norms.npz, the heatmap and depth profile, the diagnosis tags and its
    summary metrics, all from the dense record (every probed layer at every step this
    process trained); returns the tags. Without ``num_classes`` there is no
    ``loss.at_chance`` tag (a watched network's classes are its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(names.NORMS_NPZ))
        gradient_flow.save_npz(path, dense)
        tracker.log_artifact(path, names.NORMS_NPZ)  # sent (or spooled) before it returns
    figures = []
    if "norms" in dense:
        figures += [(plots.gradient_flow, names.GRADIENT_FLOW_PLOT, "norms", "dLoss/d(output)"),
                    (plots.depth_profile_at_steps, names.DEPTH_PROFILE_PLOT, "norms",
                     "dLoss/d(layer output)")]
    if "weight_norms" in dense:
        figures += [(plots.gradient_flow, names.WEIGHT_GRADIENT_FLOW_PLOT, "weight_norms",
                     "dLoss/d(layer weights)"),
                    (plots.depth_profile_at_steps, names.WEIGHT_DEPTH_PROFILE_PLOT,
                     "weight_norms", "dLoss/d(layer weights)")]
    for make, path, column, quantity in figures:
        fig = make(dense["steps"], list(dense["layers"]), dense[column], title,
                   batches_per_epoch=steps_per_epoch, quantity=quantity)
        try:
            tracker.log_figure(fig, path)
        finally:
            plots.close(fig)
    tags = {names.HEALTH_TAG: "unknown"}
    if "norms" in dense and len(dense["steps"]):  # the rules read output-gradient norms
        tags = health.diagnose(dense["steps"], list(dense["layers"]), dense["norms"],
                               dense["loss"], num_classes or 2)
        if num_classes is None:
            tags.pop(names.AT_CHANCE_TAG, None)
        first, head = (float(np.median(dense["norms"][:, i])) for i in (0, -1))
        tracker.log_totals({names.FIRST_LAYER_MEDIAN: first,
                            names.FIRST_TO_LAST_DECADES: health.decades(first, head)})
    tracker.set_tags(tags)
    return tags


def layer_summary(dense: dict[str, np.ndarray], layers) -> tuple[list[float], list[str]]:
    """Each of ``layers``' median norm and status (output norms, else weight norms)."""
    column = "norms" if "norms" in dense else "weight_norms"
    norms = dense.get(column)
    if norms is None or not len(norms):
        return [math.nan] * len(layers), ["-"] * len(layers)
    index = {layer: i for i, layer in enumerate(dense["layers"])}
    statuses = health.layer_statuses(norms)
    picked = [index[layer] for layer in layers]
    return ([float(np.median(norms[:, i])) for i in picked], [statuses[i] for i in picked])


def log_page(tracker, dense: dict[str, np.ndarray], tags: dict[str, str], *, run_name: str,
             model: str, skip: bool | None, params: dict | None = None,
             test_accuracy: float | None = None, steps_per_epoch: int | None = None,
             every_step=None) -> None:
    """report.html: the run's answer, figures and tables on one self-contained page."""
    statuses = {}
    if "norms" in dense and len(dense["steps"]):
        statuses = dict(zip(dense["layers"], health.layer_statuses(dense["norms"])))
    page = report_html.training_report(
        dense, tags, run_name=run_name, run_id=tracker.run_id, model=model, skip=skip,
        params=params, test_accuracy=test_accuracy, steps_per_epoch=steps_per_epoch,
        every_step=every_step, statuses=statuses)
    tracker.log_text(page, names.REPORT_HTML)


def log_model(cfg: Config, tracker, model: nn.Module) -> None:
    """The trained model (``log_model``), exported for any device."""
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
