"""The only code that writes to MLflow.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default
local store (``sqlite:///mlflow.db``, artifacts under ``./mlruns``). Under ``mlflow run`` the
run already exists (``MLFLOW_RUN_ID``) and holds the ``-P`` values as params; we attach to it.

Per-step points never cost the training loop a store call: chunks of probe values go on a
queue, and a writer thread turns them into ``log_batch`` calls of at most 1,000 metrics
(MLflow's limit per call). One ``log_metrics`` call per step would cost ~6.7 ms each on a
2-core machine, more than a GPU training step; batched, the store takes ~10k points/s.
"""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import warnings
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from . import names

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_CALL = 100


def fail_pending_run(reason: str) -> None:
    """End the run ``mlflow run`` created for us as FAILED, when we refuse to start.

    Best effort: a bad parameter must still print its one line even if the store is down.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, names.ERROR_TAG, reason[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the user's error line matters more than this one
        pass


def _system_metrics_available() -> bool:
    """MLflow samples CPU and memory with psutil, GPUs with nvidia-ml-py (pynvml)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("notice: system metrics off: psutil is not installed", file=sys.stderr)
        return False
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver, no GPU, or no package: CPU/memory only
        print(f"notice: GPU system metrics unavailable ({type(e).__name__}); logging CPU and "
              "memory only", file=sys.stderr)
    return True


class MetricWriter(threading.Thread):
    """Background thread: probe chunks and epoch metrics in, ``log_batch`` calls out.

    It also keeps every point it sent (``series``), so the end-of-run JSON and plot are made
    from exactly what the store holds.
    """

    def __init__(self, run_id: str, on_values: Callable[[Any], None] | None = None):
        super().__init__(name="mlflow-metric-writer", daemon=True)
        self.run_id = run_id
        self.client = MlflowClient()
        self.queue: queue.Queue = queue.Queue()
        self.series: dict[str, list[tuple[int, float]]] = {}
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
                self._send(self._metrics(item))
            except BaseException as e:  # noqa: BLE001 - surfaced by close()
                self.error = e

    def _metrics(self, item) -> list[Metric]:
        kind, payload, keys = item
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
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_CALL])
        for m in metrics:
            self.series.setdefault(m.key, []).append((m.step, m.value))


class Tracker:
    """One MLflow run: params, tags, streamed metrics, artifacts, and its end status."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self._writer: MetricWriter | None = None

    # --- start ------------------------------------------------------------------------
    @classmethod
    def start(cls, run_name: str, params: dict[str, str], tags: dict[str, str],
              experiment_id: str | None = None, system_metrics: bool = False) -> "Tracker":
        # Attaches to MLFLOW_RUN_ID under `mlflow run` (renaming it); otherwise creates a run
        # in MLFLOW_EXPERIMENT_NAME/_ID (or the default experiment), with git/source tags.
        # nested=True: inside `all` (or any active run) the new run becomes its child.
        if system_metrics:
            system_metrics = _system_metrics_available()
        run = mlflow.start_run(run_name=run_name, nested=True, experiment_id=experiment_id,
                               log_system_metrics=system_metrics)
        tracker = cls(run.info.run_id)
        tracker._log_params(params)
        tracker.set_tags(tags)
        return tracker

    def _log_params(self, params: dict[str, str]) -> None:
        # `mlflow run` has logged every MLproject parameter already, as the user typed it;
        # logging the same key with another string ("False" vs "false") raises, so we add
        # only the keys the run lacks.
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_CALL])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # --- metrics ----------------------------------------------------------------------
    def stream(self, keys: list[str], on_values: Callable[[Any], None] | None = None) -> None:
        """Start the writer; ``keys`` name the columns of the probe chunks."""
        self._keys = list(keys)
        self._writer = MetricWriter(self.run_id, on_values)
        self._writer.start()

    def submit(self, chunk) -> None:
        if chunk is not None:
            self._writer.queue.put(("chunk", chunk, self._keys))

    def log_epoch(self, epoch: int, metrics: dict[str, float], timestamp_ms: int) -> None:
        batch = [Metric(k, float(v), timestamp_ms, epoch) for k, v in metrics.items()]
        self._writer.queue.put(("metrics", batch, None))

    def flush(self) -> dict[str, list[tuple[int, float]]]:
        """Wait until every queued point is in the store; return all points sent, by key."""
        writer, self._writer = self._writer, None
        if writer is None:
            return {}
        writer.queue.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
        return writer.series

    # --- artifacts and end ------------------------------------------------------------
    def log_dict(self, obj: Any, path: str) -> None:
        self.client.log_dict(self.run_id, obj, path)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, figure, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def log_datasets(self, lineage) -> None:
        """One MLflow dataset input per split (``data.Lineage``), shown on the run page."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        for item in lineage:
            if item.source_type == "http":
                source = HTTPDatasetSource(item.source)
            elif item.source_type == "local":
                with warnings.catch_warnings():
                    # MLflow registers its local-file source under two names and warns that
                    # the path is ambiguous; both resolve to the same "local" source type.
                    warnings.filterwarnings("ignore", message="The specified dataset source can "
                                                             "be interpreted in multiple ways")
                    source = resolve_dataset_source(item.source)
            else:
                source = CodeDatasetSource({"generator": item.source, **item.details})
            dataset = MetaDataset(source, name=item.name, digest=item.digest)
            mlflow.log_input(dataset, context=item.context,
                             tags={"rows": str(item.rows), **{k: str(v) for k, v in item.details.items()}})

    def log_model(self, model, example, output, registered_name: str | None):
        """The trained model, as a torch.export program (``pt2``): loading it back runs no
        pickled code. ``example`` (numpy, batch >= 2, so the batch dimension stays dynamic:
        an example of batch 1 would pin it to 1) and the model's ``output`` on it give the
        signature."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        return mlflow.pytorch.log_model(
            model, name=names.MODEL, input_example=example,
            signature=infer_signature(example, output), serialization_format="pt2",
            registered_model_name=registered_name)

    def set_note(self, text: str) -> None:
        self.client.set_tag(self.run_id, names.NOTE_TAG, text)

    @contextlib.contextmanager
    def ending(self):
        """End the run however the block exits: FINISHED, KILLED on Ctrl-C, else FAILED.

        The reason of a KILLED or FAILED run goes into its ``error`` tag; the exception
        propagates, so the caller still reports it.
        """
        try:
            yield self
        except KeyboardInterrupt:
            self.end("KILLED", "interrupted (KeyboardInterrupt)")
            raise
        except BaseException as e:
            self.end("FAILED", f"{type(e).__name__}: {e}")
            raise
        self.end("FINISHED")

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run; on failure the reason goes into the ``error`` tag."""
        if self._writer is not None:  # a failure mid-run: still deliver what was measured
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        if error:
            self.client.set_tag(self.run_id, names.ERROR_TAG, error[:5000])
        mlflow.end_run(status)
