"""One MLflow run, written by this process: ``Tracker``, the only writer of a run's params,
tags, metrics, artifacts and end status (``Silent`` stands in on a DDP rank other than 0).

Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and holds the ``-P`` values as
params; ``Tracker.start`` attaches to it. Every write after the start goes through an
``Outbox``, so a server that goes away mid-run does not stop training.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from .. import names, query
from .credentials import access_error, is_unreachable, public_uri, redact, short
from .outbox import Outbox, say
from .spool import SYNC_TIMEOUT_ENV, fail_fast, restore_env, sync_timeout
from .writer import MetricWriter

MAX_PARAMS_PER_CALL = 100
NOTE_LIMIT = MAX_TAG_VAL_LENGTH  # MLflow keeps this many characters of a tag (8,000)


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


def _leave_fluent_run(run_id: str, status: str) -> None:
    """What ``mlflow.end_run`` does in this process, without its call to the server: the end
    status is a write like any other, which may have to wait in the spool."""
    from mlflow.tracking import fluent

    stack = getattr(fluent, "_active_run_stack", None)
    monitors = getattr(fluent, "run_id_to_system_metrics_monitor", None)
    if stack is None or monitors is None:  # another MLflow layout: end it the plain way
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
        return
    runs = stack.get()
    if runs and runs[-1].info.run_id == run_id:
        runs.pop()
        os.environ.pop("MLFLOW_RUN_ID", None)
        with contextlib.suppress(Exception):
            fluent._last_active_run_id.set(run_id)
    monitor = monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()  # its last system metrics; MLflow logs and swallows its own failures


class Silent:
    """What a DDP rank other than 0 holds in place of a ``Tracker``: the same calls, and
    nothing sent anywhere (only rank 0 talks to MLflow)."""

    run_id = "rank-follower"

    def __init__(self, keys=None):
        self._keys = []

    def set_tags(self, tags, delete=()): pass
    def set_note(self, text, full_text_at=()): pass
    def stream(self, keys, on_values=None, history=None): pass
    def submit(self, chunk): pass
    def log_epoch(self, epoch, metrics, timestamp_ms): pass
    def log_totals(self, metrics): pass
    def wait(self): pass
    def flush(self): return {}
    def log_dict(self, obj, path): pass
    def log_artifact(self, local_path, path): pass
    def log_figure(self, figure, path): pass
    def log_datasets(self, lineage): pass

    @contextlib.contextmanager
    def ending(self):
        yield self


_PREDICTION_DEVICE_LOCK = threading.Lock()  # the variable is process-wide


@contextlib.contextmanager
def _predict_on_cpu():
    """While saving, MLflow loads the model back as a pyfunc to check the input example,
    and its pyfunc loader puts a model on CUDA whenever a GPU is visible, where a ``pt2``
    program exported with CPU weights (``train._log_model``) refuses to load: a WARNING on
    every GPU machine, and an unchecked example. MLflow's own switch,
    ``MLFLOW_DEFAULT_PREDICTION_DEVICE``, keeps that check on the CPU for the duration."""
    key = "MLFLOW_DEFAULT_PREDICTION_DEVICE"
    with _PREDICTION_DEVICE_LOCK:
        saved = os.environ.get(key)
        os.environ[key] = "cpu"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved


class Tracker:
    """One MLflow run: params, tags, streamed metrics, artifacts, and its end status."""

    def __init__(self, run_id: str, experiment_id: str | None = None):
        self.run_id, self.experiment_id = run_id, experiment_id
        self.client = MlflowClient()
        self._writer: MetricWriter | None = None
        self._outbox = Outbox(run_id, self.client, experiment_id)
        self._stage: str | None = None   # temporary files of artifacts on their way
        self._staged = 0
        self._env_added: list[str] = []  # FAIL_FAST_ENV names this tracker set

    # --- start ------------------------------------------------------------------------
    @classmethod
    def start(cls, run_name: str, params: dict[str, str], tags: dict[str, str],
              experiment_id: str | None = None, system_metrics: bool = False,
              run_id: str | None = None) -> "Tracker":
        # Attaches to MLFLOW_RUN_ID under `mlflow run` (renaming it); otherwise creates a run
        # in MLFLOW_EXPERIMENT_NAME/_ID (or the default experiment), with git/source tags.
        # nested=True: inside `all` (or any active run) the new run becomes its child.
        if system_metrics:
            system_metrics = _system_metrics_available()
        # run_id: resume that run (it becomes RUNNING again), whatever MLFLOW_RUN_ID says.
        try:
            run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=True,
                                   experiment_id=None if run_id else experiment_id,
                                   log_system_metrics=system_metrics)
            tracker = cls(run.info.run_id, run.info.experiment_id)
            tracker._log_params(params)
        except Exception as e:  # noqa: BLE001 - one line for a refused login or no server
            mine = access_error(e, mlflow.get_tracking_uri())
            if mine is None:
                raise
            raise mine from None
        # From here on, a server that goes away is noticed in seconds (FAIL_FAST_ENV) and
        # every write can wait in the spool.
        tracker._env_added = fail_fast()
        tracker.set_tags(tags)
        return tracker

    def _log_params(self, params: dict[str, str]) -> None:
        # `mlflow run` has logged every MLproject parameter already, as the user typed it;
        # logging the same key with another string ("False" vs "false") raises, so we add
        # only the keys the run lacks.
        existing = query.get_run(self.run_id).data.params
        new = [Param(k, redact(str(v))) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_CALL])

    def set_tags(self, tags: dict[str, str], delete: tuple[str, ...] = ()) -> None:
        """While points stream, the writer thread sends them (in order with the points), so
        the training loop never waits for the server; otherwise now (or into the spool).
        ``delete``: tags to remove, after setting ``tags``."""
        record = {"op": "tags", "tags": {k: redact(str(v)) for k, v in tags.items()}}
        if delete:
            record["delete"] = list(delete)
        if self._writer is not None and self._writer.is_alive():
            self._writer.queue.put(("record", record, None))
        else:
            self._outbox.send(record)

    # --- metrics ----------------------------------------------------------------------
    def stream(self, keys: list[str], on_values: Callable[[Any], None] | None = None,
               history: dict[str, list[tuple[int, float]]] | None = None) -> None:
        """Start the writer; ``keys`` name the columns of the probe chunks. ``history``: the
        points a resumed run already has (they are kept, and never sent twice)."""
        self._keys = list(keys)
        self._writer = MetricWriter(self.run_id, on_values, history, outbox=self._outbox)
        self._writer.start()

    def submit(self, chunk) -> None:
        if chunk is not None:
            self._writer.queue.put(("chunk", chunk, self._keys))

    def log_epoch(self, epoch: int, metrics: dict[str, float], timestamp_ms: int) -> None:
        batch = [Metric(k, float(v), timestamp_ms, epoch) for k, v in metrics.items()]
        self._writer.queue.put(("metrics", batch, None))

    def log_totals(self, metrics: dict[str, float]) -> None:
        """Points at step 0, sent now (after ``flush``, when the writer thread is gone). A
        summary that is undefined (NaN: a median of 0 has no decades, a watched run no test
        accuracy) is left out, so the runs table shows a blank, not a NaN to chart."""
        ms = int(time.time() * 1000)
        points = [(k, float(v), ms, 0) for k, v in metrics.items() if math.isfinite(v)]
        if points:
            self._outbox.send({"op": "metrics", "metrics": points})

    def wait(self) -> None:
        """Block until every point queued so far is in the store, or in the spool while the
        server is unreachable (before a checkpoint: a resumed run never recomputes the steps
        before it, so they must have landed)."""
        if self._writer is None:
            return
        landed = threading.Event()
        self._writer.queue.put(("barrier", landed, None))
        while not landed.wait(0.5):
            if not self._writer.is_alive() or self._writer.error is not None:
                break  # flush() will raise the writer's error

    def flush(self) -> dict[str, list[tuple[int, float]]]:
        """Wait until every queued point is in the store (or, during an outage, in the
        spool); return all points handed on, by key."""
        writer, self._writer = self._writer, None
        if writer is None:
            return {}
        writer.queue.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
        return writer.series

    # --- artifacts and end ------------------------------------------------------------
    def _stage_file(self, path: str) -> Path:
        """A fresh temporary file named like the artifact ``path``."""
        if self._stage is None:
            self._stage = tempfile.mkdtemp(prefix="pipeline-stage-")
        self._staged += 1
        folder = Path(self._stage) / str(self._staged)
        folder.mkdir()
        return folder / os.path.basename(path)

    def _send_file(self, local: Path, path: str) -> None:
        """``local`` as the artifact ``path`` (folder and file name; same file name)."""
        try:
            self._outbox.send({"op": "artifact", "file": str(Path(local).resolve()),
                               "folder": os.path.dirname(path)})
        finally:
            if self._stage is not None and Path(local).parent.parent == Path(self._stage):
                shutil.rmtree(Path(local).parent, ignore_errors=True)

    def _send_text(self, text: str, path: str) -> None:
        local = self._stage_file(path)
        local.write_text(redact(text), encoding="utf-8")
        self._send_file(local, path)

    def log_dict(self, obj: Any, path: str) -> None:
        # Serialised as MlflowClient.log_dict does: YAML for .yml/.yaml, else indented JSON.
        if os.path.splitext(path)[1] in (".yml", ".yaml"):
            import yaml

            text = yaml.dump(obj, indent=2, default_flow_style=False)
        else:
            text = json.dumps(obj, indent=2, default=str)
        self._send_text(text, path)

    def log_artifact(self, local_path, path: str) -> None:
        """Upload a local file as ``path`` (folder and file name) in the run's artifacts."""
        if os.path.basename(local_path) == os.path.basename(path):
            self._send_file(Path(local_path), path)  # copied only if it has to wait
            return
        local = self._stage_file(path)
        try:
            os.link(local_path, local)  # no copy on the same file system
        except OSError:
            shutil.copyfile(local_path, local)
        self._send_file(local, path)

    def log_text(self, text: str, path: str) -> None:
        self._send_text(text, path)

    def log_figure(self, figure, path: str) -> None:
        local = self._stage_file(path)
        figure.savefig(local)  # as MlflowClient.log_figure does for matplotlib
        self._send_file(local, path)

    def log_datasets(self, lineage) -> None:
        """One MLflow dataset input per split (``data.Lineage``), shown on the run page."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        datasets = []
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
            # What mlflow.log_input sends, kept as plain data so that it can wait in a spool.
            entity = MetaDataset(source, name=item.name, digest=item.digest)._to_mlflow_entity()
            tags = {"rows": str(item.rows), **{k: str(v) for k, v in item.details.items()}}
            datasets.append({"name": entity.name, "digest": entity.digest,
                             "source_type": entity.source_type, "source": redact(entity.source),
                             "schema": entity.schema, "profile": entity.profile,
                             "tags": {**{k: redact(v) for k, v in tags.items()},
                                      MLFLOW_DATASET_CONTEXT: item.context}})
        self._outbox.send({"op": "datasets", "datasets": datasets})

    def log_model(self, model, example, output, registered_name: str | None):
        """The trained model, as a torch.export program (``pt2``): loading it back runs no
        pickled code. ``example`` (numpy, batch >= 2, so the batch dimension stays dynamic:
        an example of batch 1 would pin it to 1) and the model's ``output`` on it give the
        signature."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        signature = infer_signature(example, output)
        # A pt2 program needs torch alone (MLflow adds itself). Named here rather than
        # inferred: MLflow infers by loading the model in a child process, 3-6 s per run on
        # the 2-core CPU, and lists whatever that process imported (tqdm, pandas, ...).
        # The local part of the version (+cu130) is not on PyPI; a nightly's version
        # (2.x.devYYYYMMDD) is not either, and stays as it is: the truth, if uninstallable.
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        error = None
        if not self._outbox.waiting:
            try:
                with _predict_on_cpu():
                    return mlflow.pytorch.log_model(
                        model, name=names.MODEL, input_example=example, signature=signature,
                        serialization_format="pt2", registered_model_name=registered_name,
                        pip_requirements=requirements)
            except Exception as e:  # noqa: BLE001 - an outage: saved into the spool below
                if not is_unreachable(e):
                    raise
                error = e
        # The server is unreachable: the same model, saved locally, waits in the spool and
        # becomes the run's logged model when it is delivered (``_apply_model``).
        local = self._stage_file(names.MODEL)
        with _predict_on_cpu():
            mlflow.pytorch.save_model(model, str(local), input_example=example,
                                      signature=signature, serialization_format="pt2",
                                      pip_requirements=requirements)
        try:
            self._outbox.keep({"op": "model", "dir": str(local), "name": names.MODEL,
                               "registered_name": registered_name}, error)
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)
        return None

    def set_note(self, text: str, full_text_at: tuple[str, ...] = ()) -> None:
        """The run's description. MLflow keeps NOTE_LIMIT characters of a tag and warns on the
        console when it cuts one; a longer text (a compare of ``layers=all`` runs) is cut
        here instead, at a line's end, with a line saying so and where the whole is."""
        if len(text) > NOTE_LIMIT:
            tail = (f"\n\n*(cut to MLflow's limit of {NOTE_LIMIT:,} characters"
                    + ("; the whole text is in " + " and ".join(f"`{a}`" for a in full_text_at)
                       if full_text_at else "")
                    + ")*\n")
            head = text[:NOTE_LIMIT - len(tail)]
            text = head[:head.rfind("\n") + 1 or len(head)].rstrip() + tail
        self.set_tags({names.NOTE_TAG: text})

    @contextlib.contextmanager
    def ending(self):
        """End the run however the block exits: FINISHED, KILLED on Ctrl-C, else FAILED.

        The reason of a KILLED or FAILED run goes into its ``error`` tag; the exception
        propagates, so the caller still reports it.
        """
        try:
            yield self
        except KeyboardInterrupt as e:
            self.end("KILLED", str(e) or "interrupted (KeyboardInterrupt)")
            raise
        except BaseException as e:
            self.end("FAILED", f"{type(e).__name__}: {e}")
            raise
        self.end("FINISHED")

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run; on failure the reason goes into the ``error`` tag.

        Writes still waiting for an unreachable server get ``PIPELINE_SYNC_TIMEOUT`` seconds
        (default 30) to get through; then they stay in the spool, and one line says how to
        deliver them later.
        """
        if self._writer is not None:  # a failure mid-run: still deliver what was measured
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        _leave_fluent_run(self.run_id, status)  # no server call: the end status may wait too
        try:
            if error:
                self._outbox.send({"op": "tags", "tags": {names.ERROR_TAG: redact(error)[:5000]}})
            points, writes = self._outbox.spooled
            if points or writes:
                self._outbox.send({"op": "tags", "tags": {names.OUTAGE_TAG: (
                    f"{points} points and {writes} other writes waited for the tracking "
                    f"server (first failure {self._outbox.first_failure})")}})
        finally:
            try:
                self._outbox.send({"op": "end", "status": status,
                                   "end_time": int(time.time() * 1000)})
                self._deliver_or_keep()
            finally:
                restore_env(self._env_added)
                self._env_added = []
                if self._stage is not None:
                    shutil.rmtree(self._stage, ignore_errors=True)
                    self._stage = None

    def let_go(self) -> None:
        """What ``end`` does last, without ending the run (a run someone else ends, as
        ``pipeline.watch``'s): writes still waiting for an unreachable server get their time
        or stay in the spool, and the staged artifacts' folder goes."""
        self._deliver_or_keep()
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def _deliver_or_keep(self) -> None:
        with self._outbox.lock:
            if self._outbox.spool is None:
                return
            points, writes = self._outbox.spool.counts()
        timeout = sync_timeout()
        say(f"notice: {points} points and {writes} other writes still wait for the tracking "
             f"server; trying for up to {timeout:.0f} s ({SYNC_TIMEOUT_ENV})")
        if self._outbox.drain(timeout):
            return
        refused = self._outbox.error
        spool = self._outbox.abandon()
        if spool is None:
            return
        points, writes = spool.counts()
        why = f" (the server refused one: {short(refused)})" if refused is not None else ""
        print(f"spool: {points} points and {writes} other writes could not reach "
              f"{public_uri(self._outbox.uri)}{why}; replay them with: python -m pipeline sync "
              f"{shlex.quote(str(spool.folder))}", file=sys.stderr, flush=True)
