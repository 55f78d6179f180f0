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
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import describe_process, subprocess_env
from pipeline import names
from test_outage import SYNC_LINE, TRAIN, MlflowServer, finish, sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

USER = "trainer-kq7"
PASSWORD = "Vx9-quartz-LANTERN-5581-pw"
ADMIN = "admin"
ADMIN_PASSWORD = "setup-only-Admin-3390-pw"
SECRETS = (PASSWORD.encode(), f"{USER}:{PASSWORD}".encode(),
           base64.b64encode(f"{USER}:{PASSWORD}".encode()))
TOKEN = "tok-Q4mvN8-bearer-7731-zx"  # MLFLOW_TRACKING_TOKEN's value, sent as a bearer header
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
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # A password is hashed once a minute, not on every request (~0.4 s of CPU).
                   "auth_cache_ttl_seconds = 60\n")
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
            found += [f"{path}: {secret!r}" for secret in (*SECRETS, TOKEN.encode())
                      if secret in data]
    return found


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """A `mlflow server` without auth: it takes MLFLOW_TRACKING_TOKEN's bearer header (as a
    server behind a token-checking proxy would) and ignores it."""
    srv = MlflowServer(tmp_path_factory.mktemp("plain_server") / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def client_env(uri: str, **credentials: str) -> dict[str, str]:
    """A client's environment: ``uri``, the spool and sync settings, and only the given
    credential variables (none inherited from this process)."""
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", PIPELINE_SYNC_TIMEOUT="1")
    for var in CREDENTIAL_VARS:
        env.pop(var, None)
    env.update(credentials)
    return env


def wait_for_running_run(srv: MlflowServer, proc: subprocess.Popen, err: Path, at_least: int,
                         timeout: float = 180) -> str:
    """The ID of the RUNNING run (the server has older ones), once it holds ``at_least``
    train/loss points."""
    client, deadline = MlflowClient(tracking_uri=srv.url), time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early:\n{err.read_text()[-3000:]}"
        running = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     "attributes.status = 'RUNNING'")
        if running and len(client.get_metric_history(running[0].info.run_id,
                                                     names.TRAIN_LOSS)) >= at_least:
            return running[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"no run with {at_least} points within {timeout} s:\n{err.read_text()[-3000:]}")


# (server fixture, how the client authenticates, the secrets it must never write)
CREDENTIALS = {
    "username-and-password": ("auth_server", "env", SECRETS),
    "token": ("plain_server", "token", (TOKEN.encode(),)),
    "password-in-the-uri": ("auth_server", "uri", SECRETS),
}


@pytest.mark.parametrize("form", list(CREDENTIALS))
def test_no_credential_reaches_a_param_tag_note_artifact_the_console_or_the_spool(
        request, form, tmp_path, monkeypatch):
    """A real training run whose server dies near its end, so its last writes wait in a
    spool that `sync` then delivers, with the credential given each way MLflow takes one.
    The secret is searched for in the console output of both commands, the spool's files
    (spool.json, the journal, the copied artifacts), the run's params, tags and note, every
    artifact, and the server's database and artifact folder."""
    from mlflow.artifacts import download_artifacts

    fixture, how, secrets = CREDENTIALS[form]
    srv = request.getfixturevalue(fixture)
    as_user(monkeypatch)  # this process reads the results with the user's own login
    uri = srv.url
    credentials = {"env": {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD},
                   "token": {"MLFLOW_TRACKING_TOKEN": TOKEN}, "uri": {}}[how]
    if how == "uri":
        uri = srv.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    env = client_env(uri, PIPELINE_SPOOL_DIR=str(tmp_path / "spool"), **credentials)
    cwd = tmp_path / "client"
    cwd.mkdir()
    err = cwd / "train.stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *TRAIN, "--max-steps", "40",
                                 "--epochs", "3"], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        run_id = wait_for_running_run(srv, proc, err, at_least=4)
        srv.kill()  # the rest of the points, the artifacts, the note and the end wait
    finally:
        done = finish(proc, err)
    assert done.returncode == 0, describe_process(done)
    line = [x for x in done.stderr.splitlines() if "pipeline sync" in x]
    assert len(line) == 1, done.stderr[-3000:]
    folder = Path(SYNC_LINE.search(line[0]).group(1))
    assert {p.name for p in folder.iterdir()} >= {"spool.json", "journal.jsonl"}
    # The spool names the server without any user:password@, and holds no secret anywhere.
    assert json.loads((folder / "spool.json").read_text())["tracking_uri"] == srv.url
    assert leaks(folder) == []

    srv.start()
    synced = subprocess.run([sys.executable, "-m", "pipeline", "sync", str(folder)], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=180)
    assert synced.returncode == 0, describe_process(synced)
    assert not folder.exists()
    console = (done.stdout + done.stderr + synced.stdout + synced.stderr).encode()
    assert [s for s in secrets if s in console] == [], [l for l in console.decode().splitlines() if PASSWORD in l]

    client = MlflowClient(tracking_uri=srv.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # delivered: the run is complete
    assert names.NOTE_TAG in run.data.tags and names.CONFIG_JSON in {
        a.path for a in client.list_artifacts(run_id)}
    logged = json.dumps([run.data.params, run.data.tags]).encode()
    assert [s for s in secrets if s in logged] == []
    assert not any(var in logged.decode() for var in CREDENTIAL_VARS)
    everything = Path(download_artifacts(run_id=run_id, dst_path=str(tmp_path / "artifacts"),
                                         tracking_uri=srv.url))
    assert len([p for p in everything.rglob("*") if p.is_file()]) >= 4  # config, plots, JSON
    assert leaks(everything, srv.db, srv.artifacts, cwd) == []


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
