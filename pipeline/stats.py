"""Per-layer statistics of gradient histories (pandas): the medians, spreads and statuses
the compare step's tables and figures are made of."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .health import status


def layer_stats(history: pd.DataFrame, layers: list[str] | None = None) -> pd.DataFrame:
    """One row per layer of one run, input side first.

    ``history`` must include the run's output-side probed layer as its last layer: it is
    the reference of the status rule, whichever ``layers`` are reported.
    """
    rows = []
    for layer, g in history.groupby("layer", observed=True, sort=True):
        v = g.sort_values("step")["norm"].to_numpy()
        k = max(1, len(v) // 10)  # early/late: first and last tenth of the steps
        rows.append({
            "layer": layer, "steps": len(v),
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "first": float(v[0]), "last": float(v[-1]),
            "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9)),
            "early_median": float(np.median(v[:k])), "late_median": float(np.median(v[-k:])),
            "zero_fraction": float((v == 0).mean()),
        })
    stats = pd.DataFrame(rows)
    reference = stats["median"].iloc[-1]
    stats["status"] = [status(m, z, reference) for m, z in zip(stats["median"], stats["zero_fraction"])]
    if layers is not None:
        stats = stats[stats["layer"].isin(layers)].reset_index(drop=True)
    return stats


def epoch_stats(history: pd.DataFrame, layers: list[str] | None = None) -> pd.DataFrame:
    """Median, zero fraction and status per (layer, epoch): the time course a median hides."""
    frames = []
    for epoch, g in history.groupby("epoch", sort=True):
        s = layer_stats(g, layers)[["layer", "median", "zero_fraction", "status"]]
        s.insert(1, "epoch", int(epoch))
        frames.append(s)
    return pd.concat(frames, ignore_index=True)
