"""The status rule, its thresholds and a run's diagnosis: pure numpy, shared by training
and compare (docs: guide/compare.md, "Reading the summary").

A layer's median norm is divided by the median of the run's output-side layer (the head),
over the same steps; the ratio names its status. A run's diagnosis walks from the head
toward the input, as the gradient flows, and names the first layer whose gradient is gone.
"""
from __future__ import annotations

import math

import numpy as np

from . import names

STATUS_RULES = (  # (status, ratio strictly below which it applies), checked in order
    ("Vanishing", 1e-18),  # the notebook's ~1e-21 early layers
    ("Tiny", 1e-9),
    ("Weak", 1e-3),
)
EXPLODING_RATIO = 1e3
DEAD_ZERO_FRACTION = 0.5  # Dead: at least this share of the steps has a norm of exactly 0
# How far from Healthy: exploding is as bad as vanishing, dead is the end.
SEVERITY = {"Healthy": 0, "Weak": 1, "Tiny": 2, "Vanishing": 3, "Exploding": 3, "Dead": 4}
GONE = ("Vanishing", "Dead")  # a layer whose gradient no longer reaches it

# loss.at_chance: the median loss of the last LOSS_TAIL of the steps is within
# CHANCE_TOLERANCE (relative) of ln(num_classes), a uniform guess's cross-entropy.
LOSS_TAIL = 0.10
CHANCE_TOLERANCE = 0.01


def status(median: float, zero_fraction: float, reference: float) -> str:
    """Dead, Vanishing, Tiny, Weak, Healthy or Exploding: ``median`` relative to
    ``reference`` (the head's median); a bare ``median`` when the reference is 0."""
    if zero_fraction >= DEAD_ZERO_FRACTION:
        return "Dead"
    if not math.isfinite(median):
        return "Exploding"
    ratio = median / reference if reference > 0 and math.isfinite(reference) else median
    for label, below in STATUS_RULES:
        if ratio < below:
            return label
    return "Exploding" if ratio > EXPLODING_RATIO else "Healthy"


def decades(a: float, b: float) -> float:
    """log10(a / b): how many decades ``a`` sits above ``b``; NaN unless both are > 0."""
    if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
        return math.log10(a / b)
    return math.nan


def layer_statuses(norms) -> list[str]:
    """Each column's status (rows = steps, columns = layers in forward order, the head last):
    its median relative to the head's, or Dead when mostly zero."""
    norms = np.asarray(norms, dtype=np.float64)
    if not len(norms):
        return []
    medians = np.median(norms, axis=0)
    zero = (norms == 0).mean(axis=0)
    reference = float(medians[-1])  # the head: the layer nearest the loss
    return [status(float(m), float(z), reference) for m, z in zip(medians, zero)]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def diagnose(steps, layers, norms, loss, num_classes: int) -> dict[str, str]:
    """The ``gradient.*`` and ``loss.at_chance`` tags of a dense history (rows = steps,
    columns = ``layers`` in forward order, the head last)."""
    norms = np.asarray(norms, dtype=np.float64).reshape(len(steps), len(layers))
    loss = np.asarray(loss, dtype=np.float64)
    tags: dict[str, str] = {}
    if not len(steps) or not len(layers):
        return {names.HEALTH_TAG: "unknown"}
    below_head = norms[:, :-1] if len(layers) > 1 else np.zeros((len(steps), 0))
    zero_steps = float((below_head == 0).all(axis=1).mean()) if below_head.shape[1] else 0.0
    medians = np.median(norms, axis=0)
    reference = float(medians[-1])  # the head: the layer nearest the loss
    statuses = layer_statuses(norms)
    first_vanishing = next((layers[i] for i in range(len(layers) - 1, -1, -1)
                            if statuses[i] in GONE), "none")
    if zero_steps >= DEAD_ZERO_FRACTION:
        health = "dead"
    elif "Exploding" in statuses:
        health = "exploding"
    elif first_vanishing != "none":
        health = "vanishing"
    else:
        health = "healthy"
    ratio = medians[0] / reference if reference > 0 else math.inf if medians[0] > 0 else math.nan
    tags[names.HEALTH_TAG] = health
    tags[names.FIRST_VANISHING_TAG] = first_vanishing
    tags[names.FIRST_TO_LAST_TAG] = _fmt(ratio)
    tags[names.ZERO_STEP_FRACTION_TAG] = _fmt(zero_steps)
    finite = loss[np.isfinite(loss)]
    if len(finite):
        tail = finite[-max(1, int(math.ceil(len(finite) * LOSS_TAIL))):]
        chance = math.log(num_classes)
        at_chance = abs(float(np.median(tail)) - chance) <= CHANCE_TOLERANCE * chance
        tags[names.AT_CHANCE_TAG] = str(at_chance).lower()
    return tags
