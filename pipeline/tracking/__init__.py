"""The only code that writes to MLflow (docs: internals/spool.md, operations/outages.md).

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default local
store (``sqlite:///mlflow.db``, artifacts under ``./mlruns``).

    experiments   which experiment a run goes to
    credentials   redaction, and one line for a refused login or an unreachable server
    run           Tracker: one run's params, tags, metrics, artifacts and end
    writer        the background thread that batches metric points
    outbox        in-order delivery, and the spool while the server is away
    spool         the spool on disk, and ``python -m pipeline sync``
    status        ending runs this process does not hold
"""
from .credentials import (CREDENTIAL_VARS, TrackingError, check_access, is_unreachable,
                          public_uri, redact)
from .experiments import Target, open_experiment, resolve as resolve_experiment, use_experiment
from .outbox import Outbox
from .run import NOTE_LIMIT, Silent, Tracker
from .spool import (FAIL_FAST_ENV, MAX_METRICS_PER_CALL, SPOOL_DIR_ENV, SYNC_TIMEOUT_ENV, Spool,
                    spool_root, sync, sync_timeout)
from .status import end_if_running, fail_pending_run, fail_run, mark_launcher
from .writer import MetricWriter

__all__ = ["CREDENTIAL_VARS", "FAIL_FAST_ENV", "MAX_METRICS_PER_CALL", "NOTE_LIMIT",
           "SPOOL_DIR_ENV", "SYNC_TIMEOUT_ENV", "MetricWriter", "Outbox", "Silent", "Spool",
           "Target", "Tracker", "TrackingError", "check_access", "end_if_running",
           "fail_pending_run", "fail_run", "is_unreachable", "mark_launcher", "open_experiment", "public_uri",
           "redact", "resolve_experiment", "spool_root", "sync", "sync_timeout",
           "use_experiment"]
