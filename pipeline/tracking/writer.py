"""The metric writer: a background thread that turns probe chunks into ``log_batch`` calls, so
the training loop never waits for the store (one ``log_metrics`` call per step costs ~6.7 ms
on a 2-core CPU, more than a GPU step; batched, the store takes ~10k points/s).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from .outbox import Outbox
from .spool import MAX_METRICS_PER_CALL


class MetricWriter(threading.Thread):
    """Background thread: probe chunks and epoch metrics in, ``log_batch`` calls out.

    It also keeps every point it handed on (``series``: delivered, or waiting in the spool
    during an outage), so the end-of-run JSON and plot are made from exactly what the store
    holds, or will once the spool is delivered. Tags set while it runs go through it too
    (``("record", ...)`` items), so the training thread never waits for the server.
    """

    def __init__(self, run_id: str, on_values: Callable[[Any], None] | None = None,
                 history: dict[str, list[tuple[int, float]]] | None = None,
                 outbox: Outbox | None = None):
        super().__init__(name="mlflow-metric-writer", daemon=True)
        self.run_id = run_id
        self.client = MlflowClient()
        self.outbox = outbox or Outbox(run_id, self.client)
        self.queue: queue.Queue = queue.Queue()
        # A resumed run starts from the points its store already holds; a (key, step) seen
        # there is not sent again (steps redone after a crash would otherwise repeat).
        self.series: dict[str, list[tuple[int, float]]] = {
            k: list(v) for k, v in (history or {}).items()}
        self._present = {k: {step for step, _ in v} for k, v in self.series.items()}
        self.error: BaseException | None = None
        self.on_values = on_values

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so close() never blocks; the error is re-raised there
            try:
                if item[0] == "record":
                    self.outbox.send(item[1])
                else:
                    self._send(self._metrics(item))
            except BaseException as e:  # noqa: BLE001 - surfaced by close()
                self.error = e

    def _metrics(self, item) -> list[Metric]:
        kind, payload, keys = item
        if kind == "barrier":  # everything queued before it is in the store
            payload.set()
            return []
        if kind == "metrics":
            return payload
        chunk = payload
        values = chunk.values()  # waits here, in this thread, for the device->host copy
        if self.on_values is not None:
            self.on_values(values)
        out = []
        for r, (row, ts) in enumerate(zip(values, chunk.timestamps_ms)):
            step = chunk.first_step + r
            out += [Metric(key, float(v), ts, step) for key, v in zip(keys, row)]
        return out

    def _send(self, metrics: list[Metric]) -> None:
        if self._present:
            metrics = [m for m in metrics if m.step not in self._present.get(m.key, ())]
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            part = metrics[i:i + MAX_METRICS_PER_CALL]
            self.outbox.send({"op": "metrics",
                              "metrics": [(m.key, m.value, m.timestamp, m.step) for m in part]})
            for m in part:
                self.series.setdefault(m.key, []).append((m.step, m.value))
