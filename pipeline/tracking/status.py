"""Writes about a run this process does not hold: the run `mlflow run` opened before a refusal,
a DDP run whose ranks died, the launch that resumed another run. Best effort: the user's one
line on the console comes first.
"""
from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

from .. import names, query
from .credentials import redact

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
        if query.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the user's error line matters more than this one
        pass


def end_if_running(run_id: str, status: str, reason: str) -> None:
    """End a run its process could not end (killed by the DDP agent after a signal)."""
    try:
        client = MlflowClient()
        if query.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run_id, names.ERROR_TAG, reason)
            client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - best effort, as fail_run
        pass


def mark_launcher(pending_id: str, resumed_id: str) -> None:
    """`mlflow run -P resume=ID` opens a new run before our code starts; training continues
    run ID instead, and this one says so (MLflow ends it when the command exits)."""
    client = MlflowClient()
    client.set_tag(pending_id, names.RESUMED_INTO_TAG, resumed_id)
    client.set_tag(pending_id, names.NOTE_TAG, f"This launch resumed run `{resumed_id}`; "
                                               "its metrics and artifacts are there.")
