"""Credentials, for real: a `mlflow server --app-name basic-auth` and a user of its own.

The server keeps its users in a sqlite database configured by a basic_auth.ini in a temporary
folder (MLFLOW_AUTH_CONFIG_PATH); the admin account only creates the training user, whose
distinctive password reaches the pipeline through MLflow's environment variables alone. After
the runs, the tracking database's bytes, every file under the server's artifact folder and
every spool are searched for the password, the user:password pair and its Basic-auth form.
"""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import describe_process, subprocess_env
from pipeline import names
from test_outage import SYNC_LINE, TRAIN, MlflowServer, sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

USER = "trainer-kq7"
PASSWORD = "Vx9-quartz-LANTERN-5581-pw"
ADMIN = "admin"
ADMIN_PASSWORD = "setup-only-Admin-3390-pw"
SECRETS = (PASSWORD.encode(), f"{USER}:{PASSWORD}".encode(),
           base64.b64encode(f"{USER}:{PASSWORD}".encode()))
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth`, with the training user created by the admin."""
    directory = tmp_path_factory.mktemp("auth_server")
    ini = directory / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
                   f"admin_username = {ADMIN}\n"
                   f"admin_password = {ADMIN_PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    srv = MlflowServer(directory / "server", app_name="basic-auth",
                       env={"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-secret"})
    srv.start()
    try:
        request = urllib.request.Request(
            srv.url + "/api/2.0/mlflow/users/create", method="POST",
            data=json.dumps({"username": USER, "password": PASSWORD}).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": _basic(ADMIN, ADMIN_PASSWORD)})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
        yield srv
    finally:
        srv.kill()


def as_user(monkeypatch, user: str = USER, password: str = PASSWORD) -> None:
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def train(srv: MlflowServer, cwd: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    full = subprocess_env(MLFLOW_TRACKING_URI=srv.url, OMP_NUM_THREADS="1", **env)
    for var in CREDENTIAL_VARS:
        if var not in env:
            full.pop(var, None)
    return subprocess.run([sys.executable, "-m", "pipeline", *TRAIN, *extra], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=240)


def leaks(*roots: Path) -> list[str]:
    """Every file under ``roots`` holding a secret, with which one."""
    found = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            data = path.read_bytes()
            found += [f"{path}: {secret!r}" for secret in SECRETS if secret in data]
    return found


def test_a_run_through_basic_auth_finishes_and_no_credential_is_stored(auth_server, tmp_path,
                                                                       monkeypatch):
    spool = tmp_path / "spool"
    done = train(auth_server, tmp_path / "client", "--max-steps", "6", "--epochs", "1",
                 MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD,
                 PIPELINE_SPOOL_DIR=str(spool))
    assert done.returncode == 0, describe_process(done)
    assert PASSWORD not in done.stdout + done.stderr

    as_user(monkeypatch)
    client = MlflowClient(tracking_uri=auth_server.url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.tags["mlflow.user"] != PASSWORD
    logged = json.dumps([run.data.params, run.data.tags])
    assert PASSWORD not in logged and not any(v in logged for v in CREDENTIAL_VARS)
    config = client.download_artifacts(run.info.run_id, names.CONFIG_JSON, str(tmp_path / "dl"))
    assert PASSWORD not in Path(config).read_text()

    assert auth_server.db.exists() and list(auth_server.artifacts.rglob(names.CONFIG_JSON))
    assert leaks(auth_server.db, auth_server.artifacts, tmp_path / "client") == []
    assert not spool.exists() or leaks(spool) == []


def test_a_spool_written_under_basic_auth_holds_no_credential(auth_server, tmp_path,
                                                              monkeypatch, capfd):
    """A run whose server dies: what waits on disk, and what `sync` then stores, carry no
    credential, even where a message quoted one (an error, a tag, a text artifact)."""
    from pipeline import tracking

    as_user(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    monkeypatch.setenv(tracking.SPOOL_DIR_ENV, str(tmp_path / "spool"))
    monkeypatch.setenv(tracking.SYNC_TIMEOUT_ENV, "1")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(auth_server.url)
    try:
        client = MlflowClient(tracking_uri=auth_server.url)
        experiment = client.create_experiment("security-spool")  # the user's own: MANAGE
        tracker = tracking.Tracker.start("spool-secrets", {"lr": "0.1"}, {},
                                         experiment_id=experiment)
        run_id = tracker.run_id
        tracker.stream([names.TRAIN_LOSS])
        tracker.log_epoch(0, {names.TEST_ACCURACY: 0.5}, 1000)
        tracker.wait()
        auth_server.kill(signal.SIGTERM)
        tracker.set_tags({"quoted": f"login {USER}:{PASSWORD} failed"})
        tracker.log_epoch(1, {names.TEST_ACCURACY: 0.75}, 2000)
        tracker.flush()
        tracker.log_text(f"password={PASSWORD}\n", "notes/leak.txt")
        tracker.end("FAILED", f"RuntimeError: http://{USER}:{PASSWORD}@host refused")
    finally:
        mlflow.set_tracking_uri(None)
    line = [x for x in capfd.readouterr().err.splitlines() if "pipeline sync" in x]
    assert len(line) == 1, line
    folder = Path(SYNC_LINE.search(line[0]).group(1))
    assert (folder / "journal.jsonl").exists()
    assert leaks(folder) == []

    auth_server.start()
    synced = sync(folder, tmp_path, MLFLOW_TRACKING_USERNAME=USER,
                  MLFLOW_TRACKING_PASSWORD=PASSWORD)
    assert synced.returncode == 0, describe_process(synced)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["quoted"] == f"login {USER}:*** failed"
    assert PASSWORD not in run.data.tags[names.ERROR_TAG], run.data.tags[names.ERROR_TAG]
    assert leaks(auth_server.db, auth_server.artifacts) == []


def test_without_or_with_wrong_credentials_train_stops_with_one_line_before_any_data_work(
        auth_server, tmp_path, monkeypatch):
    from pipeline import tracking
    from pipeline.config import UserError

    # CIFAR-10 into an empty folder: any data work would try a download first.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cifar = ("--dataset", "cifar10", "--data-dir", str(data_dir), "--max-steps", "2")
    for env, says in (({}, "no credentials were given"),
                      ({"MLFLOW_TRACKING_USERNAME": USER,
                        "MLFLOW_TRACKING_PASSWORD": "not-the-password-1234"},
                       f"refused user {USER!r}")):
        done = train(auth_server, tmp_path / "client", *cifar, **env)
        assert done.returncode == 2, describe_process(done)
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
        assert "authentication failed" in lines[0] and says in lines[0], lines[0]
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert var in lines[0], lines[0]
        assert "not-the-password" not in done.stderr
        assert not any(data_dir.iterdir()), sorted(data_dir.rglob("*"))

    # A user the server knows but who may not write to an experiment: one line too.
    as_user(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    mlflow.set_tracking_uri(auth_server.url)
    try:
        with pytest.raises(UserError, match="permission denied") as refused:
            tracking.Tracker.start("not-mine", {}, {}, experiment_id="0")  # Default: READ only
        assert PASSWORD not in str(refused.value)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        mlflow.set_tracking_uri(None)
