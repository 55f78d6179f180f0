"""The only code that writes to MLflow.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default
local store (``sqlite:///mlflow.db``, artifacts under ``./mlruns``). Under ``mlflow run`` the
run already exists (``MLFLOW_RUN_ID``) and holds the ``-P`` values as params; we attach to it.

Per-step points never cost the training loop a store call: chunks of probe values go on a
queue, and a writer thread turns them into ``log_batch`` calls of at most 1,000 metrics
(MLflow's limit per call). One ``log_metrics`` call per step would cost ~6.7 ms each on a
2-core machine, more than a GPU training step; batched, the store takes ~10k points/s.

A tracking server that goes away mid-run does not stop training. Every write after the start
of a run (points, tags, artifacts, datasets, the model, the end status) goes through an
``Outbox``: a write the server cannot take waits, with every later one, in a ``Spool`` (memory
and ``$PIPELINE_SPOOL_DIR/<run ID>``, default ``./mlflow-spool``), and is retried in the
background; once the server answers, the spool is delivered in order, without repeating a
(metric, step) the store already holds, and removed. A spool still there when the run ends
(after ``PIPELINE_SYNC_TIMEOUT`` s of trying) stays on disk for ``python -m pipeline sync``.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from . import names
from .config import UserError

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_CALL = 100
NOTE_LIMIT = MAX_TAG_VAL_LENGTH  # MLflow keeps this many characters of a tag (8,000)


def fail_pending_run(reason: str) -> None:
    """End the run ``mlflow run`` created for us as FAILED, when we refuse to start.

    Best effort: a bad parameter must still print its one line even if the store is down.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        fail_run(run_id, reason)


def fail_run(run_id: str, reason: str, tags: dict[str, str] | None = None) -> None:
    """``reason`` into the run's ``error`` tag; a run still RUNNING (its process died before
    it could end it) ends FAILED. For the DDP launcher, whose ranks did the logging.

    Best effort, like ``fail_pending_run``: the one line on the console comes first.
    """
    try:
        client = MlflowClient()
        for key, value in {names.ERROR_TAG: redact(reason)[:5000], **(tags or {})}.items():
            client.set_tag(run_id, key, value)
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the user's error line matters more than this one
        pass


def check_experiment(experiment: str) -> str | None:
    """Under `mlflow run`, the ID of the experiment it opened the run in; None otherwise.

    An MLflow run cannot move, so a different explicit ``experiment`` is refused with the
    fix. Cheap (one read of an existing store), so it runs before any data work.
    """
    return _checked_experiment(experiment)[0]


def _checked_experiment(experiment: str):
    """``check_experiment``'s ID, and otherwise the usable experiment found (or None)."""
    from .config import AUTO, ConfigError

    check_access()  # the first call of a run to the server: credentials are checked here
    pending = os.environ.get("MLFLOW_RUN_ID")
    if not pending:
        return None, _usable_experiment(experiment)
    client = MlflowClient()
    exp_id = client.get_run(pending).info.experiment_id
    name = client.get_experiment(exp_id).name
    if experiment not in (AUTO, exp_id, name):
        raise ConfigError("experiment", f"{experiment!r}, but `mlflow run` opened this run in "
                                        f"experiment {name!r}; choose it there: mlflow run . "
                                        f"--experiment-name {experiment} ...")
    return exp_id, None


def _usable_experiment(experiment: str):
    """The experiment ``experiment`` names, None when there is none yet; refuses a deleted
    one (MLflow refuses its runs with a traceback), or an MLFLOW_EXPERIMENT_ID that names
    none (MLflow would create an experiment *named* after the number, splitting the runs
    off where nobody looks)."""
    from . import query
    from .config import AUTO, ConfigError

    # A SQLite store that is not there yet holds no experiment; reading it would create it
    # (MLflow makes its tables at the first connection), for a run that may yet be refused.
    found = None if _absent_sqlite(mlflow.get_tracking_uri()) else query.find_experiment(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ConfigError("experiment", f"{found.name!r} (ID {found.experiment_id}) is deleted; "
                                        "restore it (mlflow experiments restore --experiment-id "
                                        f"{found.experiment_id}) or name another")
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if found is None and experiment == AUTO and env_id:
        raise ConfigError("experiment", f"MLFLOW_EXPERIMENT_ID={env_id} names no experiment in "
                                        f"{mlflow.get_tracking_uri()}; allowed: an existing "
                                        "experiment's ID, or unset it and name one with "
                                        "-P experiment=NAME")
    return found


def _absent_sqlite(uri: str) -> bool:
    if not uri.startswith("sqlite:"):
        return False
    from sqlalchemy.engine import make_url
    database = make_url(uri).database
    return bool(database) and database != ":memory:" and not os.path.exists(database)


def use_experiment(experiment: str) -> str:
    """The ID of ``experiment`` (a parameter value; ``auto`` resolves as in
    ``query.experiment_ref``), created if needed. Callers pass the ID to ``Tracker.start``;
    ``mlflow.set_experiment`` is avoided, being process-wide state."""
    from . import query

    pending, found = _checked_experiment(experiment)
    if pending is not None:
        return pending
    if found is not None:
        return found.experiment_id
    name = query.experiment_ref(experiment)
    try:
        return MlflowClient().create_experiment(name)
    except MlflowException as e:
        # Two first runs started at once (two machines, one server) both find it missing;
        # the second create fails. The experiment is there now: use it.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return query.experiment_id(name)


def mark_launcher(pending_id: str, resumed_id: str) -> None:
    """`mlflow run -P resume=ID` opens a new run before our code starts; training continues
    run ID instead, and this one says so (MLflow ends it when the command exits)."""
    client = MlflowClient()
    client.set_tag(pending_id, names.RESUMED_INTO_TAG, resumed_id)
    client.set_tag(pending_id, names.NOTE_TAG, f"This launch resumed run `{resumed_id}`; "
                                               "its metrics and artifacts are there.")


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


# --- credentials --------------------------------------------------------------------------
# Credentials reach MLflow only through its own environment variables, read by its REST
# client per request; nothing here copies them into params, tags, artifacts or the spool.
# As a second guard, every text we log (params, tags, the note, text and JSON artifacts, spool
# records) has their values blanked, and tracking URIs are shown without a user:password@.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def public_uri(uri: str) -> str:
    """``uri`` without the ``user:password@`` part a URL may carry."""
    return _USERINFO.sub(r"\g<scheme>", uri or "")


def _secrets() -> list[str]:
    values = [os.environ.get(var) for var in _SECRET_VARS]
    with contextlib.suppress(Exception):
        values.append(urllib.parse.urlsplit(mlflow.get_tracking_uri()).password)
    return [v for v in values if v and len(v) >= 4]


def redact(text: str) -> str:
    """``text`` with credential values and URL user info replaced by ``***``."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


class TrackingError(UserError, RuntimeError):
    """The tracking server refused our credentials, or cannot be reached: one line, exit 2."""


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of a request the server answered, if ``error`` is one."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code
    if isinstance(error, RestException) or (isinstance(error, MlflowException)
                                            and "failed with error code" in str(error)):
        return error.get_http_status_code()
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not be reached or could not answer
    (refused or reset connection, timeout, HTTP 429 or 5xx): a later try may succeed. A
    request the server answered and refused (4xx: a bad value, no permission) is not one."""
    import requests
    import urllib3

    for e in _chain(error):
        if isinstance(e, (requests.ConnectionError, requests.Timeout,
                          requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
                          urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        status = _http_status(e)
        if status is not None:
            return status in (429, 500, 502, 503, 504)
    return False


def _access_error(error: BaseException, uri: str) -> TrackingError | None:
    """A one-line error for a refused login or an unreachable server, else None."""
    statuses = {_http_status(e) for e in _chain(error)}
    where = public_uri(uri)
    if 401 in statuses:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            given = (f"it refused user {user!r} with the password in MLFLOW_TRACKING_PASSWORD; "
                     "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            given = "it refused the token in MLFLOW_TRACKING_TOKEN; check it"
        else:
            given = ("no credentials were given: set MLFLOW_TRACKING_USERNAME and "
                     "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        return TrackingError(f"tracking: authentication failed at {where}: {given} "
                             "(credentials are read from these variables only)")
    if 403 in statuses:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        return TrackingError(
            f"tracking: permission denied at {where}"
            + (f" for user {user!r}" if user else "")
            + ": ask the server's admin for access, or use another account "
              "(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")
    if is_unreachable(error):
        return TrackingError(f"tracking: the tracking server at {where} cannot be reached "
                             f"({_short(error)}); start it, or point MLFLOW_TRACKING_URI at "
                             "a running one")
    return None


_ACCESS_CHECKED: set[str] = set()


def _refuse_file_store(uri: str) -> None:
    """MLflow 3 refuses its old file store (a folder or file: URI) with a paragraph inside
    a traceback, at the first call; here it is one line, before any data work."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    scheme = urllib.parse.urlparse(uri).scheme
    if (scheme == "file" or len(scheme) <= 1) and not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(f"tracking: MLFLOW_TRACKING_URI={uri} is MLflow's file store, which "
                            f"MLflow {mlflow.__version__} refuses; allowed: sqlite:///mlflow.db "
                            "(the default when it is unset), another database URI, or "
                            "http(s)://HOST:PORT (MLFLOW_ALLOW_FILE_STORE=true opts back in)")


def check_access() -> None:
    """One cheap authenticated read of a tracking server (not of a local store), so that a
    missing or wrong credential stops a run with one line before any data or device work.
    MLflow's own retries apply here: a server that is still starting is waited for."""
    uri = mlflow.get_tracking_uri()
    _refuse_file_store(uri)
    if not uri.startswith(("http://", "https://")) or uri in _ACCESS_CHECKED:
        return
    _no_url_with_credentials_on_stdout(uri)
    _check_answers(uri)
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
        mine = _access_error(e, uri)
        if mine is None:
            raise
        raise mine from None
    _ACCESS_CHECKED.add(uri)


def _no_url_with_credentials_on_stdout(uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends; with a
    ``user:password@`` URI that line would carry the password, so it is turned off
    (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, unless set) for this process."""
    if public_uri(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _check_answers(uri: str) -> None:
    """A server that takes the connection and never answers: one line after one try of
    MLFLOW_HTTP_REQUEST_TIMEOUT (20 s unless set), where MLflow's client would wait 8 tries
    of 120 s (~20 min). A server that is still starting refuses the connection instead, and
    MLflow's retries in ``check_access`` wait for it; any answer at all (even an error page)
    passes, and refused, reset or TLS errors are left to MLflow's client."""
    import requests

    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
                    or FAIL_FAST_ENV["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).close()
    except requests.Timeout:
        raise TrackingError(f"tracking: the tracking server at {public_uri(uri)} took the "
                            f"connection but did not answer within {timeout:.0f} s "
                            "(MLFLOW_HTTP_REQUEST_TIMEOUT); check that it is running and not "
                            "overloaded, or point MLFLOW_TRACKING_URI at a running one") from None
    except requests.RequestException:
        pass


# --- outages: fail fast, spool, replay ----------------------------------------------------
SPOOL_DIR_ENV = "PIPELINE_SPOOL_DIR"        # where spools go (default ./mlflow-spool)
SYNC_TIMEOUT_ENV = "PIPELINE_SYNC_TIMEOUT"  # s the end of a run waits for a spool to drain
DEFAULT_SPOOL_DIR = "mlflow-spool"
DEFAULT_SYNC_TIMEOUT = 30.0
RETRY_SECONDS = 5.0                         # the longest pause between two delivery attempts

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
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _fail_fast() -> list[str]:
    """Set the FAIL_FAST_ENV values the user has not set; returns the names set."""
    added = [k for k in FAIL_FAST_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = FAIL_FAST_ENV[k]
    return added


def _restore_env(added: list[str]) -> None:
    for k in added:
        os.environ.pop(k, None)


def _short(error: BaseException) -> str:
    """The innermost cause of ``error``, in one short line."""
    inner = list(_chain(error))[-1]
    text = " ".join(redact(str(inner)).split())
    return f"{type(inner).__name__}: {text[:160]}"


def spool_root() -> Path:
    return Path(os.environ.get(SPOOL_DIR_ENV) or DEFAULT_SPOOL_DIR).resolve()


def sync_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(SYNC_TIMEOUT_ENV, DEFAULT_SYNC_TIMEOUT)))
    except ValueError:
        return DEFAULT_SYNC_TIMEOUT


def _say(line: str) -> None:
    """One line on stderr, above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


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


def _apply(client: MlflowClient, run_id: str, record: dict, base: Path | None = None,
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
        _apply_model(client, run_id, record, base / record["dir"])
    elif op == "end":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown spool record {op!r}")
    return 0


def _apply_model(client: MlflowClient, run_id: str, record: dict, folder: Path) -> None:
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


class Outbox:
    """Delivers a run's writes in order. A write the server cannot take (``is_unreachable``)
    goes to a ``Spool``, and so does every later one while it holds anything, so the order
    holds; a thread retries the oldest every few seconds (1, 2, 4, then every 5 s) and, once
    one gets through, delivers the rest, oldest first, then removes the spool."""

    def __init__(self, run_id: str, client: MlflowClient, experiment_id: str | None = None):
        self.run_id, self.client, self.experiment_id = run_id, client, experiment_id
        self.uri = mlflow.get_tracking_uri()
        self.lock = threading.Condition(threading.RLock())
        self.spool: Spool | None = None
        self.error: BaseException | None = None  # the server refused a replayed write
        self.spooled = [0, 0]                    # points, other writes: ever spooled
        self.first_failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    def _new_folder(self) -> Path:
        """``<spool root>/<run ID>``; ``<run ID>-2``, ... when an earlier process of the same
        run (a resumed one) left its spool there, which `sync` delivers in name order."""
        root, n = spool_root(), 1
        while (root / (self.run_id if n == 1 else f"{self.run_id}-{n}")).exists():
            n += 1
        return root / (self.run_id if n == 1 else f"{self.run_id}-{n}")

    def send(self, record: dict) -> None:
        """Deliver ``record`` now, or keep it in the spool (then it is delivered later)."""
        with self.lock:
            if self.spool is None:
                try:
                    _apply(self.client, self.run_id, record)
                    return
                except Exception as e:
                    if not is_unreachable(e):
                        raise
                    self._open(e)
            self._keep(record)

    def keep(self, record: dict, error: BaseException | None = None) -> None:
        """Put ``record`` in the spool without trying the server (``error``: it just failed)."""
        with self.lock:
            if self.spool is None:
                self._open(error)
            self._keep(record)

    @property
    def waiting(self) -> bool:
        with self.lock:
            return self.spool is not None

    def _keep(self, record: dict) -> None:
        self.spool.add(record)
        if record["op"] == "metrics":
            self.spooled[0] += len(record["metrics"])
        else:
            self.spooled[1] += 1
        self.lock.notify_all()

    def _open(self, error: BaseException | None) -> None:
        self.spool = Spool.create(self._new_folder(), self.run_id, self.experiment_id, self.uri)
        if self.first_failure is None:
            self.first_failure = time.strftime("%Y-%m-%d %H:%M:%S")
        why = f" ({_short(error)})" if error is not None else ""
        _say(f"notice: the tracking server at {public_uri(self.uri)} is unreachable{why}; "
             f"training goes on, writes wait in {self.spool.folder} and are retried every "
             f"{RETRY_SECONDS:.0f} s")
        self._stop.clear()
        self._thread = threading.Thread(target=self._retry, name="mlflow-spool-retry",
                                        daemon=True)
        self._thread.start()

    def _retry(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set() or self._replay() or self.error is not None:
                return
            delay = min(2 * delay, RETRY_SECONDS)

    def _replay(self) -> bool:
        """Deliver the spool, oldest first; True once it is empty (and removed)."""
        present: dict[str, set[int]] = {}
        delivered = [0, 0]
        with self.lock:
            spool = self.spool
        while spool is not None and not self._stop.is_set():
            with self.lock:
                if not spool.records:
                    self.spool = None
                    spool.remove()
                    _say(f"notice: the tracking server at {public_uri(self.uri)} is back; "
                         f"{delivered[0]} points and {delivered[1]} other writes that waited "
                         "were delivered")
                    self.lock.notify_all()
                    return True
                record = spool.records[0]
            try:
                _apply(self.client, self.run_id, record, spool.folder, present)
            except Exception as e:  # noqa: BLE001 - an outage: retried; else: kept, reported
                if is_unreachable(e):
                    return False
                with self.lock:
                    self.error = e
                    self.lock.notify_all()
                return False
            with self.lock:
                spool.delivered(record)
                if record["op"] == "metrics":
                    delivered[0] += len(record["metrics"])
                else:
                    delivered[1] += 1
        return False

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the spool to be delivered; True when nothing waits."""
        deadline = time.monotonic() + timeout
        self._wake.set()  # try now, not at the next tick
        with self.lock:
            while self.spool is not None and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.5))
            return self.spool is None

    def abandon(self) -> Spool | None:
        """Stop retrying; what still waits stays in the spool folder, for `sync`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()
        return spool


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
    added = _fail_fast()
    try:
        for folder in folders:
            _sync_one(folder, echo)
    finally:
        _restore_env(added)


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
    _no_url_with_credentials_on_stdout(uri)
    client = MlflowClient(tracking_uri=uri)
    points, writes = spool.counts()
    echo(f"sync: run {run_id}: {points} points and {writes} other writes from {folder} "
         f"to {public_uri(uri)}")
    present: dict[str, set[int]] = {}
    sent = 0
    try:
        client.get_run(run_id)
        for record in list(spool.records):
            sent += _apply(client, run_id, record, folder, present)
            spool.delivered(record)
    except Exception as e:  # noqa: BLE001 - turned into one line when it is ours
        mine = _access_error(e, uri)
        if mine is None:
            if not isinstance(e, MlflowException):
                raise
            mine = TrackingError(f"sync: the server at {public_uri(uri)} refused a write of "
                                 f"run {run_id}: {_short(e)}")
        left = spool.counts()
        raise TrackingError(f"{mine}; {left[0]} points and {left[1]} other writes are kept "
                            f"in {folder}: run python -m pipeline sync {shlex.quote(str(folder))} "
                            "again later") from None
    spool.remove()
    status = client.get_run(run_id).info.status
    echo(f"sync: done: {sent} points sent ({points - sent} were there already), {writes} "
         f"other writes; run {run_id} is {status}; removed {folder}")


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


def end_if_running(run_id: str, status: str, reason: str) -> None:
    """End a run its process could not end (killed by the DDP agent after a signal)."""
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run_id, names.ERROR_TAG, reason)
            client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - best effort, as fail_run
        pass


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
        self.run_id = run_id
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
            mine = _access_error(e, mlflow.get_tracking_uri())
            if mine is None:
                raise
            raise mine from None
        # From here on, a server that goes away is noticed in seconds (FAIL_FAST_ENV) and
        # every write can wait in the spool.
        tracker._env_added = _fail_fast()
        tracker.set_tags(tags)
        return tracker

    def _log_params(self, params: dict[str, str]) -> None:
        # `mlflow run` has logged every MLproject parameter already, as the user typed it;
        # logging the same key with another string ("False" vs "false") raises, so we add
        # only the keys the run lacks.
        existing = self.client.get_run(self.run_id).data.params
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
        """Points at step 0, sent now (after ``flush``, when the writer thread is gone)."""
        ms = int(time.time() * 1000)
        self._outbox.send({"op": "metrics",
                           "metrics": [(k, float(v), ms, 0) for k, v in metrics.items()]})

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
                _restore_env(self._env_added)
                self._env_added = []
                if self._stage is not None:
                    shutil.rmtree(self._stage, ignore_errors=True)
                    self._stage = None

    def _deliver_or_keep(self) -> None:
        with self._outbox.lock:
            if self._outbox.spool is None:
                return
            points, writes = self._outbox.spool.counts()
        timeout = sync_timeout()
        _say(f"notice: {points} points and {writes} other writes still wait for the tracking "
             f"server; trying for up to {timeout:.0f} s ({SYNC_TIMEOUT_ENV})")
        if self._outbox.drain(timeout):
            return
        refused = self._outbox.error
        spool = self._outbox.abandon()
        if spool is None:
            return
        points, writes = spool.counts()
        why = f" (the server refused one: {_short(refused)})" if refused is not None else ""
        print(f"spool: {points} points and {writes} other writes could not reach "
              f"{public_uri(self._outbox.uri)}{why}; replay them with: python -m pipeline sync "
              f"{shlex.quote(str(spool.folder))}", file=sys.stderr, flush=True)
