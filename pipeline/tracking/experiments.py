"""Which experiment a run goes to: refused in one line when it cannot be used, created when
it does not exist yet."""
from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import query
from ..config import AUTO, ConfigError
from .credentials import check_access

@dataclass(frozen=True)
class Target:
    """Where a run goes, resolved before it opens: an experiment's ID, or (ID None) the name
    of one to create when the run opens."""

    experiment_id: str | None
    name: str


def resolve(experiment: str) -> Target:
    """What ``experiment`` (a parameter value; ``auto`` as in ``query.experiment_ref``)
    names. Under `mlflow run`, the experiment it opened the run in: an MLflow run cannot
    move, so a different explicit ``experiment`` is refused with the fix. Cheap (one read of
    an existing store), so it runs before any data work."""
    check_access()  # the first call of a run to the server: credentials are checked here
    pending = os.environ.get("MLFLOW_RUN_ID")
    if pending:
        found = query.experiment_of(pending)
        if experiment not in (AUTO, found.experiment_id, found.name):
            raise ConfigError("experiment", f"{experiment!r}, but `mlflow run` opened this run "
                                            f"in experiment {found.name!r}; choose it there: "
                                            f"mlflow run . --experiment-name {experiment} ...")
        return Target(found.experiment_id, found.name)
    found = _usable_experiment(experiment)
    if found is not None:
        return Target(found.experiment_id, found.name)
    return Target(None, query.experiment_ref(experiment))


def open_experiment(target: Target) -> str:
    """The target's ID, the experiment created if it does not exist yet. Callers pass the
    ID to ``Tracker.start``; ``mlflow.set_experiment`` is avoided, being process-wide state."""
    if target.experiment_id is not None:
        return target.experiment_id
    try:
        return MlflowClient().create_experiment(target.name)
    except MlflowException as e:
        # Two first runs started at once (two machines, one server) both find it missing;
        # the second create fails. The experiment is there now: use it.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return query.experiment_id(target.name)


def use_experiment(experiment: str) -> str:
    """``resolve`` then ``open_experiment``: for steps that open their run at once."""
    return open_experiment(resolve(experiment))


def _usable_experiment(experiment: str):
    """The experiment ``experiment`` names, None when there is none yet; refuses a deleted
    one (MLflow refuses its runs with a traceback), or an MLFLOW_EXPERIMENT_ID that names
    none (MLflow would create an experiment *named* after the number, splitting the runs
    off where nobody looks)."""
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
