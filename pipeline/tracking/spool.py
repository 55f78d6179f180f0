"""The outage spool: a run's writes that have not reached its tracking server, kept in order on
disk, and their delivery, later in the run (``outbox.Outbox``) or by ``python -m pipeline
sync`` (docs: operations/outages.md).

The spool asks its own server what a replay must not repeat (the steps a metric already has,
a model already logged): reads for writing correctly, the one exception to ``query`` being
the only reader.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .credentials import (HTTP_REQUEST_TIMEOUT_S, TrackingError, access_error,
                          no_url_with_credentials_on_stdout, public_uri, short)

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
SPOOL_DIR_ENV = "PIPELINE_SPOOL_DIR"        # where spools go (default ./mlflow-spool)
SYNC_TIMEOUT_ENV = "PIPELINE_SYNC_TIMEOUT"  # s the end of a run waits for a spool to drain
DEFAULT_SPOOL_DIR = "mlflow-spool"
DEFAULT_SYNC_TIMEOUT = 30.0

# MLflow's REST client retries a failed call by itself, with exponential backoff: by default
# 7 times with factor 2 (2 + 4 + ... + 120 s: about 4 minutes) and 120 s per try
# (mlflow.environment_variables). A writer that waits that long on each call notices an outage
# only minutes later, and every end-of-run write would hang as long. While a run is live this
# process uses 2 retries with factor 1 (retries after 0 and 2 s) and a 20 s timeout per try,
# so a refused connection is known within ~3 s; the spool's own retries (every <= 5 s) take
# over from there. A value set in the environment wins. The start of a run (creating it, its
# params) keeps MLflow's patient defaults: a server that is still starting is waited for.
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_REQUEST_TIMEOUT_S)}


def fail_fast() -> list[str]:
    """Set the FAIL_FAST_ENV values the user has not set; returns the names set."""
    added = [k for k in FAIL_FAST_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = FAIL_FAST_ENV[k]
    return added


def restore_env(added: list[str]) -> None:
    for k in added:
        os.environ.pop(k, None)


def spool_root() -> Path:
    return Path(os.environ.get(SPOOL_DIR_ENV) or DEFAULT_SPOOL_DIR).resolve()


def sync_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(SYNC_TIMEOUT_ENV, DEFAULT_SYNC_TIMEOUT)))
    except ValueError:
        return DEFAULT_SYNC_TIMEOUT


class Spool:
    """The writes of one run that have not reached its tracking server yet, oldest first,
    in memory (``records``) and in a folder, so that nothing is lost if the process ends:

    * ``spool.json``: the run ID, its experiment, the server (without credentials);
    * ``journal.jsonl``: one write per line, in order: ``metrics`` ([key, value, timestamp,
      step] points), ``tags``, ``artifact`` (a file under ``files/``), ``datasets``,
      ``model`` (a saved MLflow model under ``files/``), ``end`` (status and end time);
    * ``delivered``: the sequence number of each write delivered since, one per line.
    """

    def __init__(self, folder: Path, meta: dict, records: list[dict], next_seq: int = 0):
        self.folder, self.meta, self.records = Path(folder), meta, records
        self._next = next_seq

    @classmethod
    def create(cls, folder: Path, run_id: str, experiment_id: str | None, uri: str) -> "Spool":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ignore = folder.parent / ".gitignore"  # a spool never belongs in a repository
        if not ignore.exists():
            with contextlib.suppress(OSError):
                ignore.write_text("# spools of runs: python -m pipeline sync <folder>\n*\n")
        meta = {"format": 1, "run_id": run_id, "experiment_id": experiment_id,
                "tracking_uri": public_uri(uri), "pid": os.getpid(),
                "host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "closed": False}
        spool = cls(folder, meta, [])
        spool._write_meta()
        return spool

    @classmethod
    def open(cls, folder: Path) -> "Spool":
        folder = Path(folder)
        meta = json.loads((folder / "spool.json").read_text())
        done = set()
        if (folder / "delivered").exists():
            done = {int(x) for x in (folder / "delivered").read_text().split() if x.isdigit()}
        records, next_seq = [], 0
        if (folder / "journal.jsonl").exists():
            for line in (folder / "journal.jsonl").read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: the write was never acknowledged
                next_seq = max(next_seq, record["seq"] + 1)
                if record["seq"] not in done:
                    records.append(record)
        return cls(folder, meta, records, next_seq)

    def _write_meta(self) -> None:
        tmp = self.folder / "spool.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, self.folder / "spool.json")

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, record: dict) -> dict:
        """Keep ``record``; a file or folder it names is copied into ``files/<seq>/``."""
        record = dict(record, seq=self._next)
        self._next += 1
        for key in ("file", "dir"):
            if key in record and Path(record[key]).is_absolute():
                src = Path(record[key])
                rel = Path("files") / str(record["seq"]) / src.name
                (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, self.folder / rel)
                else:
                    shutil.copy2(src, self.folder / rel)
                record[key] = rel.as_posix()
        self._append(self.folder / "journal.jsonl", json.dumps(record))
        self.records.append(record)
        return record

    def delivered(self, record: dict) -> None:
        self._append(self.folder / "delivered", str(record["seq"]))
        self.records.remove(record)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder / "files" / str(record["seq"]))

    def counts(self) -> tuple[int, int]:
        """(metric points, other writes) still waiting."""
        points = sum(len(r["metrics"]) for r in self.records if r["op"] == "metrics")
        return points, sum(r["op"] != "metrics" for r in self.records)

    def close(self) -> None:
        """The process that wrote the spool is done with it: `sync` may take over."""
        self.meta["closed"] = True
        self._write_meta()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the spool root, once it holds nothing else
            if [p.name for p in self.folder.parent.iterdir()] == [".gitignore"]:
                (self.folder.parent / ".gitignore").unlink()
                self.folder.parent.rmdir()


def _metric(point) -> Metric:
    key, value, timestamp, step = point
    return Metric(key, float(value), int(timestamp), int(step))


def apply(client: MlflowClient, run_id: str, record: dict, base: Path | None = None,
           present: dict[str, set[int]] | None = None) -> int:
    """Perform one write; returns the metric points sent. ``base``: the folder that relative
    file names in ``record`` are under. ``present``: when given (a replay), the steps each key
    already has in the store, read once per key; points already there are not sent again (a
    batch whose response was lost may have been stored)."""
    base = Path(base) if base is not None else Path.cwd()
    op = record["op"]
    if op == "metrics":
        points = record["metrics"]
        if present is not None:
            for key in {p[0] for p in points} - present.keys():
                present[key] = {m.step for m in client.get_metric_history(run_id, key)}
            fresh, seen = [], set()
            for p in points:
                if int(p[3]) not in present[p[0]] and (p[0], int(p[3])) not in seen:
                    seen.add((p[0], int(p[3])))
                    fresh.append(p)
            points = fresh
        for i in range(0, len(points), MAX_METRICS_PER_CALL):
            part = points[i:i + MAX_METRICS_PER_CALL]
            client.log_batch(run_id, metrics=[_metric(p) for p in part])
            if present is not None:
                for p in part:
                    present[p[0]].add(int(p[3]))
        return len(points)
    if op == "tags":
        if record["tags"]:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        for key in record.get("delete", ()):
            try:
                client.delete_tag(run_id, key)
            except MlflowException:
                pass  # already gone (a replay of this record)
    elif op == "artifact":
        client.log_artifact(run_id, str(base / record["file"]), record["folder"] or None)
    elif op == "datasets":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"],
                                       d.get("schema"), d.get("profile")),
                               tags=[InputTag(k, v) for k, v in d["tags"].items()])
                  for d in record["datasets"]]
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException as e:
            # Two runs logging the same dataset (name + digest) to one experiment at the same
            # instant both insert it, and one gets a unique-key violation (seen on
            # PostgreSQL). The dataset row exists then; a second try only links it.
            if e.error_code not in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE",
                                    "RESOURCE_ALREADY_EXISTS", "INTERNAL_ERROR"):
                raise
            time.sleep(0.5)
            client.log_inputs(run_id, datasets=inputs)
    elif op == "model":
        apply_model(client, run_id, record, base / record["dir"])
    elif op == "end":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown spool record {op!r}")
    return 0


def apply_model(client: MlflowClient, run_id: str, record: dict, folder: Path) -> None:
    """Log a model saved in the spool as the run's logged model, as ``Model.log`` would have:
    a LoggedModel linked to the run, its files, READY; registered if asked. A READY model of
    that name from this run means an earlier replay got through: nothing is redone."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    exp = run.info.experiment_id
    mine = [m for m in client.search_logged_models(
                [exp], filter_string=f"source_run_id = '{run_id}'") if m.name == record["name"]]
    ready = [m for m in mine if m.status == LoggedModelStatus.READY]
    if ready:
        model = ready[0]
    else:
        model = mine[0] if mine else client.create_logged_model(
            exp, name=record["name"], source_run_id=run_id, params=run.data.params)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        mlmodel = Model.load(str(folder))
        mlmodel.model_uuid = mlmodel.model_id = model.model_id
        mlmodel.run_id, mlmodel.artifact_path = run_id, model.artifact_location
        mlmodel.save(str(folder / "MLmodel"))
        client.log_model_artifacts(model.model_id, str(folder))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    name = record.get("registered_name")
    if name:
        versions = client.search_model_versions(f"name = '{name}'")
        if not any(getattr(v, "model_id", None) == model.model_id
                   or v.source == f"models:/{model.model_id}" for v in versions):
            with contextlib.suppress(MlflowException):
                client.create_registered_model(name)
            client.create_model_version(name, f"models:/{model.model_id}", run_id=run_id,
                                        model_id=model.model_id)


def _spool_folders(path: Path) -> list[Path]:
    if (path / "spool.json").exists():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if (p / "spool.json").exists())
    return []


def sync(path: str, echo: Callable[[str], None] = print) -> None:
    """``python -m pipeline sync PATH``: deliver a spool (or every spool in a folder of them)
    to ``MLFLOW_TRACKING_URI``, else to the server the spool names. Idempotent: metric points
    whose (key, step) the run already holds are skipped, tags and artifacts are overwritten
    with the same content, a model already READY is kept. The spool is removed once all of it
    landed. Raises TrackingError (one line, exit 2) while the server cannot be reached."""
    root = Path(path).expanduser().resolve()
    folders = _spool_folders(root)
    if not folders:
        raise TrackingError(f"sync: no spool at {root} (a folder holding spool.json, or a "
                            "folder of them); already delivered?")
    added = fail_fast()
    try:
        for folder in folders:
            _sync_one(folder, echo)
    finally:
        restore_env(added)


def _sync_one(folder: Path, echo: Callable[[str], None]) -> None:
    spool = Spool.open(folder)
    run_id = spool.meta["run_id"]
    if not spool.meta.get("closed") and spool.meta.get("host") == socket.gethostname():
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if spool.meta.get("pid") and spool.meta["pid"] != os.getpid():
                os.kill(int(spool.meta["pid"]), 0)
                raise TrackingError(f"sync: the run's own process (pid {spool.meta['pid']}) "
                                    f"is still delivering {folder}; wait for it to end")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spool.meta["tracking_uri"]
    no_url_with_credentials_on_stdout(uri)
    client = MlflowClient(tracking_uri=uri)
    points, writes = spool.counts()
    echo(f"sync: run {run_id}: {points} points and {writes} other writes from {folder} "
         f"to {public_uri(uri)}")
    present: dict[str, set[int]] = {}
    sent = 0
    try:
        client.get_run(run_id)
        for record in list(spool.records):
            sent += apply(client, run_id, record, folder, present)
            spool.delivered(record)
    except Exception as e:  # noqa: BLE001 - turned into one line when it is ours
        mine = access_error(e, uri)
        if mine is None:
            if not isinstance(e, MlflowException):
                raise
            mine = TrackingError(f"sync: the server at {public_uri(uri)} refused a write of "
                                 f"run {run_id}: {short(e)}")
        left = spool.counts()
        raise TrackingError(f"{mine}; {left[0]} points and {left[1]} other writes are kept "
                            f"in {folder}: run python -m pipeline sync {shlex.quote(str(folder))} "
                            "again later") from None
    spool.remove()
    status = client.get_run(run_id).info.status
    echo(f"sync: done: {sent} points sent ({points - sent} were there already), {writes} "
         f"other writes; run {run_id} is {status}; removed {folder}")
