"""Every probed layer at every step: the dense record, the metric split, and the watches on it
(docs: guide/run-logs.md).

``Collector`` keeps every chunk the probes read back, for ``gradients/norms.npz`` (its schema:
guide/run-logs.md); gives the metric writer the every-step layers with their log10 twins and
the loss (``MetricColumns``), and collects the thinned layers' points (``layers=all``) for the
training thread to send, so the loop never waits for the device; and warns once when the
network dies. ``NonFiniteWatch`` counts NaN/Inf values as they reach the host.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from . import names
# The console says the network died after this many consecutive steps read back with every
# layer below the head at exactly zero gradient.
DEAD_STEPS = 20


def every_step_layers(layers: tuple[str, ...], wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The layers logged as metrics every step: ``wanted`` (the five defaults with
    ``layers=all``) in ``layers``' order, or all of ``layers`` when ``wanted`` is None."""
    if wanted is None:
        return tuple(layers)
    return tuple(layer for layer in layers if layer in set(wanted))


class MetricColumns:
    """A probes.Chunk as the metric writer sees it: the every-step norms, their log10 twins
    and the loss (``Collector.keys``).

    ``values()`` runs in the writer thread: it waits for the device copy (as Chunk.values
    does), hands the full array to the collector and returns the writer's columns.
    """

    def __init__(self, chunk, collector: "Collector"):
        self.chunk, self.collector = chunk, collector
        self.first_step = chunk.first_step
        self.timestamps_ms = chunk.timestamps_ms

    def values(self) -> np.ndarray:
        full = self.chunk.values()
        self.collector(self.first_step, self.timestamps_ms, full)
        return self.collector.metric_values(full)


def log10_norms(norms: np.ndarray) -> np.ndarray:
    """log10 of norms, LOG10_FLOOR for any below 10**LOG10_FLOOR (zeros); NaN stays NaN."""
    floor = 10.0 ** names.LOG10_FLOOR
    with np.errstate(invalid="ignore"):
        return np.log10(np.maximum(norms, floor))


class Collector:
    """Keeps every chunk read back (numpy, in order), the thinned metric points, and warns
    once when every layer below the head reads exactly zero for DEAD_STEPS steps."""

    def __init__(self, layers: tuple[str, ...], every_step: tuple[str, ...], metric_every: int,
                 then: Callable[[np.ndarray], None] | None = None,
                 warn: Callable[[str], None] | None = None, outputs: bool = True,
                 weights: bool = False, loss: bool = True):
        self.layers = list(layers)
        self.metric_every = metric_every
        self.then = then
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.outputs, self.weights = outputs, weights
        L = len(self.layers)
        # The probes' row: [output norms (L, with outputs)] [loss] [weight norms (L, with weights)]
        self.loss_col = L if outputs else 0
        series = ([(i, names.grad_norm(layer), layer) for i, layer in enumerate(self.layers)]
                  if outputs else [])
        if weights:
            series += [(self.loss_col + 1 + i, names.weight_grad_norm(layer), layer)
                       for i, layer in enumerate(self.layers)]
        keep = set(every_step)
        # The metric writer's view: the every-step norms, their log10 twins, then the loss
        # (last, as the console's loss reads it).
        self.columns = [c for c, _, layer in series if layer in keep]
        every = [key for _, key, layer in series if layer in keep]
        self._norm_keys = every + [names.log10_key(key) for key in every]
        self.with_loss = loss  # pipeline.watch without a loss given: no train/loss metric
        self.thinned = [(c, key, names.log10_key(key)) for c, key, layer in series
                        if layer not in keep]
        # Every column of the full row, named: the NaN watch's keys.
        self.all_keys = [None] * (self.loss_col + 1 + (L if weights else 0))
        for c, key, _ in series:
            self.all_keys[c] = key
        self.all_keys[self.loss_col] = names.TRAIN_LOSS
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # (step, ms, {key: value})
        self.zero_run = 0
        self.died_at: int | None = None

    @property
    def keys(self) -> list[str]:
        """The metric writer's keys, in ``metric_values``' order."""
        return self._norm_keys + ([names.TRAIN_LOSS] if self.with_loss else [])

    def wrap(self, chunk):
        return None if chunk is None else MetricColumns(chunk, self)

    def metric_values(self, full: np.ndarray) -> np.ndarray:
        """The writer's columns of full probe rows, in ``keys``' order."""
        norms = full[:, self.columns]
        loss = [full[:, [self.loss_col]]] if self.with_loss else []
        return np.concatenate([norms, log10_norms(norms), *loss], axis=1)

    def __call__(self, first_step: int, timestamps_ms: list[int], values: np.ndarray) -> None:
        self.chunks.append((first_step, values))
        if self.thinned:
            for r, ts in enumerate(timestamps_ms[:len(values)]):
                step = first_step + r
                if step % self.metric_every == 0:
                    point = {}
                    for c, key, log_key in self.thinned:
                        point[key] = float(values[r, c])
                        point[log_key] = float(log10_norms(values[r, c]))
                    self.pending.append((step, ts, point))
        self._watch_death(first_step, values)
        if self.then is not None:
            self.then(values)

    def _watch_death(self, first_step: int, values: np.ndarray) -> None:
        if self.died_at is not None or len(self.layers) < 2 or not self.outputs:
            return
        for r, dead in enumerate((values[:, :len(self.layers) - 1] == 0).all(axis=1)):
            self.zero_run = self.zero_run + 1 if dead else 0
            if self.zero_run >= DEAD_STEPS:
                self.died_at = first_step + r - DEAD_STEPS + 1
                self.warn(f"warning: the network died at step {self.died_at}: every layer below "
                          f"{self.layers[-1]} has had exactly zero gradient for {DEAD_STEPS} "
                          "steps (it no longer learns)")
                return

    def take_pending(self) -> list[tuple[int, int, dict[str, float]]]:
        """The thinned points collected so far (list.pop is atomic: safe beside the writer)."""
        out = []
        while self.pending:
            out.append(self.pending.pop(0))
        return out

    def dense(self) -> dict[str, np.ndarray]:
        """The npz arrays (schema: docs guide/run-logs.md), rows in step order."""
        rows = sorted(self.chunks, key=lambda c: c[0])
        L = len(self.layers)
        if rows:
            steps = np.concatenate([np.arange(s, s + len(v), dtype=np.int64) for s, v in rows])
            table = np.concatenate([v for _, v in rows]).astype(np.float64)
        else:
            steps, table = np.zeros(0, dtype=np.int64), np.zeros((0, len(self.all_keys)))
        out = {"steps": steps, "layers": np.array(self.layers, dtype=str),
               "loss": table[:, self.loss_col]}
        if self.outputs:
            out["norms"] = table[:, :L]
        if self.weights:
            out["weight_norms"] = table[:, self.loss_col + 1:self.loss_col + 1 + L]
        return out


class NonFiniteWatch:
    """Counts NaN/Inf losses and norms as chunks reach the host (in the writer thread, so
    the training loop never waits); remembers the first."""

    def __init__(self, keys: list[str], first_step: int):
        self.keys, self.next_step = keys, first_step
        self.count = 0
        self.first: tuple[int, str, float] | None = None

    def __call__(self, values: np.ndarray) -> None:
        bad = ~np.isfinite(values)
        if bad.any():
            self.count += int(bad.sum())
            if self.first is None:
                r, c = np.argwhere(bad)[0]
                self.first = (self.next_step + int(r), self.keys[c], float(values[r, c]))
        self.next_step += len(values)

    @property
    def tags(self) -> dict[str, str]:
        if self.first is None:
            return {names.NONFINITE_COUNT_TAG: "0"}
        step, key, value = self.first
        return {names.NONFINITE_COUNT_TAG: str(self.count),
                names.NONFINITE_FIRST_TAG: f"{key}={value} at step {step}"}


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
