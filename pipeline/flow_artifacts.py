"""A run's gradient-flow artifacts and diagnosis tags from its dense record, for runs that
are not this project's training runs (``pipeline.watch``, the Lightning callback).

One function, ``log_gradient_flow``. It writes what ``train._log_gradient_flow`` writes
(``gradients/norms.npz``, the heatmap and depth profile, the ``gradient.*`` tags) plus the
part of ``train._log_artifacts`` that is about gradients (``gradients/gradients.json`` and
``plots/gradient_norms.png``), without the training run's Config, data or description: the
two are meant to become one function when train.py's artifact code moves out of it.
"""
from __future__ import annotations

import os
import tempfile

from . import gradient_flow, names, plots


def log_gradient_flow(tracker, dense: dict, series: dict[str, list[tuple[int, float]]],
                      every_step: tuple[str, ...], title: str,
                      num_classes: int | None = None,
                      batches_per_epoch: int | None = None) -> dict[str, str]:
    """Log the dense record's artifacts and the diagnosis tags; returns the tags.

    ``dense``: ``Collector.dense()``; ``series``: the points the metric writer handed on
    (``Tracker.flush``), from which ``gradients.json`` and its plot are made, so they equal
    the metrics; ``every_step``: the layers logged every step. ``num_classes``: the
    ``loss.at_chance`` tag needs it, and is left out without it.
    """
    outputs = "norms" in dense
    key = names.grad_norm if outputs else names.weight_grad_norm
    gradients = {layer: [v for _, v in sorted(series.get(key(layer), []))] for layer in every_step}
    tracker.log_dict(gradients, names.GRADIENTS_JSON)
    quantity = "dLoss/d(layer output)" if outputs else "dLoss/d(layer weights)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(names.NORMS_NPZ))
        gradient_flow.save_npz(path, dense)
        tracker.log_artifact(path, names.NORMS_NPZ)  # sent (or spooled) before it returns
    _log(tracker, plots.gradient_norms(gradients, f"Gradient norms - {title}",
                                       batches_per_epoch=batches_per_epoch, quantity=quantity),
         names.GRADIENT_PLOT)
    heatmaps = []
    if outputs:
        heatmaps += [(plots.gradient_flow, names.GRADIENT_FLOW_PLOT, "norms", "dLoss/d(output)"),
                     (plots.depth_profile_at_steps, names.DEPTH_PROFILE_PLOT, "norms",
                      "dLoss/d(layer output)")]
    if "weight_norms" in dense:
        heatmaps += [(plots.gradient_flow, names.WEIGHT_GRADIENT_FLOW_PLOT, "weight_norms",
                      "dLoss/d(layer weights)"),
                     (plots.depth_profile_at_steps, names.WEIGHT_DEPTH_PROFILE_PLOT,
                      "weight_norms", "dLoss/d(layer weights)")]
    for make, path, column, what in heatmaps:
        _log(tracker, make(dense["steps"], list(dense["layers"]), dense[column], title,
                           batches_per_epoch=batches_per_epoch, quantity=what), path)
    if outputs:  # the rules read output-gradient norms (README, "What a training run logs")
        # diagnose needs a class count for loss.at_chance alone; without one that tag goes.
        tags = gradient_flow.diagnose(dense["steps"], list(dense["layers"]), dense["norms"],
                                      dense["loss"], num_classes or 2)
        if num_classes is None:
            tags.pop(names.AT_CHANCE_TAG, None)
    else:
        tags = {names.HEALTH_TAG: "unknown"}
    tracker.set_tags(tags)
    # report.html: pipeline/report_html.py's writer joins here, with the same inputs (the
    # dense record, the series and these tags), so watched runs get it as training runs do.
    return tags


def _log(tracker, fig, path: str) -> None:
    try:
        tracker.log_figure(fig, path)
    finally:
        plots.close(fig)
