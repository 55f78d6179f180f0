"""The team tracking server: `make server` with PostgreSQL and served artifacts, for real.

A throw-away PostgreSQL cluster (Debian's binaries, initdb in a temporary folder, listening
on 127.0.0.1 only) holds the runs; `make server` starts `mlflow server` on it with its
artifacts served from a temporary folder, behind MLflow's basic-auth app (users in
PostgreSQL too). Two training processes log to it at the same time, as two machines would,
then a compare process, all with credentials in environment variables; the test reads
everything back through the tracking API, and checks where the bytes landed.

Needs PostgreSQL's server binaries (`apt-get install postgresql`); where they are missing the
tests skip with the reason printed, and fail under CI=true (``conftest.require``). A cluster
that is there but does not start (initdb fails, the server does not come up) is real
breakage: a failure everywhere. Set PG_BIN to the folder holding initdb and pg_ctl when they
live elsewhere.
"""
from __future__ import annotations

import glob
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import describe_process, require, subprocess_env
from runs_helpers import REPO_ROOT, RUN_VARS, Store, free_port, wait_for_health

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRAIN = ["train", "--dataset", "synthetic", "--image-size", "32", "--max-steps", "3",
         "--epochs", "1", "--num-workers", "0", "--synthetic-size", "64",
         "--synthetic-test-size", "16", "--device", "cpu", "--log-model", "false"]
STEPS = [0, 1, 2]
DB_USER = "mlflow"
DB_PASSWORD = "team-server-test"  # reaches the server through PGPASSWORD only
ADMIN, ADMIN_PASSWORD = "admin", "team-server-admin"  # first start: MLFLOW_AUTH_ADMIN_PASSWORD
# MLflow's basic-auth configuration (an ini file named by MLFLOW_AUTH_CONFIG_PATH). The cache
# saves a password hash (~0.4 s of CPU here) per request.
AUTH_INI = """[mlflow]
default_permission = EDIT
database_uri = {database_uri}
admin_username = {admin}
auth_cache_ttl_seconds = 60
"""


# --- a throw-away PostgreSQL -------------------------------------------------------------
def postgres_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: $PG_BIN, else Debian's newest, else PATH."""
    if os.environ.get("PG_BIN"):
        candidates = [os.environ["PG_BIN"]]
    else:
        debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
        which = shutil.which("initdb")
        candidates = debian[::-1] + ([str(Path(which).resolve().parent)] if which else [])
    for folder in candidates:
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")):
            return Path(folder)
    return None


@dataclass(frozen=True)
class Postgres:
    bin: Path
    dir: Path
    port: int
    as_owner: tuple[str, ...]  # prefix that runs a command as the cluster's owner

    host = "127.0.0.1"

    def uri(self, database: str) -> str:
        """The URI with no password in it; the password travels in PGPASSWORD."""
        return f"postgresql+psycopg2://{DB_USER}@{self.host}:{self.port}/{database}"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_owner, str(self.bin / tool), *args], cwd=self.dir,
                              capture_output=True, text=True, timeout=120)

    def create_database(self, name: str) -> None:
        proc = self.run("createdb", "-h", str(self.dir), "-p", str(self.port), "-U", DB_USER, name)
        assert proc.returncode == 0, describe_process(proc)


@pytest.fixture(scope="session")
def postgres():
    """A fresh PostgreSQL cluster in a temporary folder, on 127.0.0.1 and a free port.

    TCP logins need the password (scram-sha-256); the unix socket, in the cluster's own
    folder, trusts its owner. initdb refuses to run as root, so as root the cluster belongs to
    the `postgres` user that Debian's package creates.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        where = os.environ.get("PG_BIN") or "/usr/lib/postgresql/*/bin or PATH"
        require("postgresql", f"its server binaries (initdb, pg_ctl, createdb) are not in "
                              f"{where}; apt-get install -y postgresql")
    as_owner: tuple[str, ...] = ()
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            require("postgresql", "running as root, and initdb refuses root: no 'postgres' "
                                  "user to run it as (Debian's postgresql package creates it)")
        runuser = shutil.which("runuser")
        if runuser is None:
            require("postgresql", "running as root, and initdb refuses root: no runuser to "
                                  "become 'postgres' (util-linux)")
        as_owner = (runuser, "-u", "postgres", "--")
    # Not under pytest's tmp_path: as root that sits in a folder only root may enter.
    directory = Path(tempfile.mkdtemp(prefix="team-server-pg-"))
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    pg = Postgres(bin_dir, directory, free_port(), as_owner)
    started = False
    try:
        pwfile = directory / "pwfile"
        pwfile.write_text(DB_PASSWORD + "\n")
        if owner is not None:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        proc = pg.run("initdb", "-D", str(directory / "data"), "-U", DB_USER,
                      f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        if proc.returncode != 0:
            pytest.fail(f"postgresql: initdb failed: {(proc.stdout + proc.stderr)[-1500:]}",
                        pytrace=False)
        # Throw-away data: no fsync. Listens on 127.0.0.1 only; its socket in its own folder.
        options = f"-h {pg.host} -p {pg.port} -k {directory} -F -c full_page_writes=off"
        proc = pg.run("pg_ctl", "-D", str(directory / "data"), "-l", str(directory / "log"),
                      "-w", "-t", "60", "-o", options, "start")
        started = proc.returncode == 0
        if not started:
            log = directory / "log"
            pytest.fail(f"postgresql: the server did not start: "
                        f"{(proc.stdout + proc.stderr)[-800:]}"
                        f"{log.read_text()[-1500:] if log.exists() else ''}", pytrace=False)
        print(f"PostgreSQL {bin_dir.parent.name} on {pg.host}:{pg.port}, data in {directory}",
              file=sys.stderr)
        yield pg
    finally:
        if started:
            pg.run("pg_ctl", "-D", str(directory / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)


# --- `make server` -----------------------------------------------------------------------
@dataclass(frozen=True)
class TeamServer:
    url: str
    artifacts: Path
    db: Postgres
    database: str
    proc: subprocess.Popen
    log: Path

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url)

    def wait_until_healthy(self, timeout: float = 120) -> None:
        wait_for_health(self.url, self.proc, lambda: self.log.read_text()[-3000:], timeout,
                        poll=0.3)

def stop(proc: subprocess.Popen) -> None:
    """make, its shell, mlflow server and its workers: one process group, ours."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """`make server` on a new database, artifacts served from a temporary folder; started,
    not yet waited for (``wait_until_healthy``).

    The venv running this test is the one make uses; its install steps are taken as done
    (make -o), so the test never installs anything.
    """
    postgres.create_database("mlflow")
    postgres.create_database("mlflow_auth")
    directory = tmp_path_factory.mktemp("team_server")
    artifacts = directory / "mlartifacts"
    auth_ini = directory / "auth.ini"
    auth_ini.write_text(AUTH_INI.format(database_uri=postgres.uri("mlflow_auth"), admin=ADMIN))
    port = free_port()
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARS + ("MLFLOW_TRACKING_URI",)}
    env.update(PGPASSWORD=DB_PASSWORD, MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
               MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY="team-server-test-secret",
               # MLflow's GenAI job runner: seven more processes importing MLflow at start,
               # and nothing here uses them.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "server",
           f"VENV={venv}", "-o", f"{venv}/.installed", "-o", f"{venv}/.installed-server",
           f"DB_URI={postgres.uri('mlflow')}", "HOST=127.0.0.1", f"PORT={port}",
           f"ARTIFACTS={artifacts}", "SERVER_ARGS=--workers 1 --app-name basic-auth"]
    log_path = directory / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with pytest.MonkeyPatch.context() as mp:  # this process's MlflowClient logs in too
            mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            yield TeamServer(f"http://127.0.0.1:{port}", artifacts, postgres, "mlflow", proc,
                             log_path)
    finally:
        stop(proc)
        print(f"mlflow server log: {log_path}", file=sys.stderr)


def pipeline_process(server: TeamServer, cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    """``python -m pipeline ARGS`` as a client of the server, in a folder of its own (as if
    on another machine: nothing it writes locally is visible to the others)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd,
                            env=subprocess_env(Store(cwd, server.url), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def team_runs(team_server, tmp_path_factory):
    """Both variants trained at the same time by two processes, then a compare process.

    The trainings start with the server (each takes ~15 s here to import torch and build
    its model and data before its first request; MLflow's client retries a refused
    connection). They log to the Default experiment, which the server makes at start.
    """
    base = tmp_path_factory.mktemp("clients")

    def start(folder: str, *args: str, **env: str) -> subprocess.Popen:
        return pipeline_process(team_server, base / folder, *args, MLFLOW_EXPERIMENT_ID="0",
                                MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                                MLFLOW_TRACKING_USERNAME=ADMIN,
                                MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD, **env)

    # Two machines would each have their own cores; here the two share the test's, so each
    # takes one thread (two processes of all-core torch threads on the same cores crawl).
    # Different seeds, so different synthetic datasets: two runs that log the same dataset
    # to one experiment at the same instant can both try to insert it, and one fails.
    training = {variant: start(variant, *TRAIN, "--skip", flag, "--seed", seed,
                               OMP_NUM_THREADS="1")
                for variant, flag, seed in (("noskip", "false", "0"), ("skip", "true", "1"))}
    try:
        team_server.wait_until_healthy()
        trained = {variant: finish(proc) for variant, proc in training.items()}
    finally:
        for proc in training.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for variant, done in trained.items():
        assert done.returncode == 0, f"training {variant}: {describe_process(done)}"
    done = finish(start("compare", "compare"))
    assert done.returncode == 0, f"compare: {describe_process(done)}"
    client = team_server.client
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"])
    by_name = {run.info.run_name: run for run in runs}
    assert len(by_name) == len(runs), [run.info.run_name for run in runs]
    return by_name


# --- the tests ---------------------------------------------------------------------------
def grad_norm_keys(run) -> list[str]:
    return sorted(k for k in run.data.metrics if k.startswith("grad_norm/"))


def test_two_training_runs_and_a_compare_run_finish_on_the_server(team_runs):
    assert sorted(team_runs) == ["compare-resnet50", "resnet50-noskip", "resnet50-skip"]
    assert {name: run.info.status for name, run in team_runs.items()} == {
        name: "FINISHED" for name in team_runs}
    assert team_runs["resnet50-noskip"].data.tags["variant"] == "noskip"
    assert team_runs["resnet50-skip"].data.tags["variant"] == "skip"


def test_every_probed_layer_has_its_gradient_norm_at_each_of_the_three_steps(team_server,
                                                                             team_runs):
    keys = {name: grad_norm_keys(team_runs[name]) for name in ("resnet50-noskip", "resnet50-skip")}
    assert keys["resnet50-noskip"] and keys["resnet50-noskip"] == keys["resnet50-skip"], keys
    for name in keys:
        run = team_runs[name]
        for key in keys[name]:
            history = team_server.client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == STEPS, (name, key)
            assert all(math.isfinite(m.value) for m in history), (name, key)


def test_the_compare_summary_downloads_through_the_server(team_server, team_runs, tmp_path):
    compare = team_runs["compare-resnet50"]
    # Served artifacts: the run's artifacts live behind the server, not at a client path.
    assert compare.info.artifact_uri.startswith("mlflow-artifacts:/"), compare.info.artifact_uri
    path = team_server.client.download_artifacts(compare.info.run_id, "comparison/summary.md",
                                                 str(tmp_path))
    summary = Path(path).read_text()
    for name in ("resnet50-noskip", "resnet50-skip"):
        assert team_runs[name].info.run_id in summary


def test_artifacts_land_in_the_server_artifact_folder(team_server, team_runs, tmp_path):
    for name, artifact in (("compare-resnet50", "comparison/summary.md"),
                           ("resnet50-noskip", "gradients/gradients.json"),
                           ("resnet50-skip", "gradients/gradients.json")):
        run_id = team_runs[name].info.run_id
        found = list(team_server.artifacts.glob(f"*/{run_id}/artifacts/{artifact}"))
        assert len(found) == 1, (name, sorted(map(str, team_server.artifacts.rglob("*")))[:20])
        downloaded = team_server.client.download_artifacts(run_id, artifact,
                                                           str(tmp_path / name))
        assert Path(downloaded).read_bytes() == found[0].read_bytes()


def test_the_runs_are_rows_in_postgresql(team_server, team_runs):
    import psycopg2

    with psycopg2.connect(host=team_server.db.host, port=team_server.db.port, user=DB_USER,
                          password=DB_PASSWORD, dbname=team_server.database) as con:
        with con.cursor() as cur:
            cur.execute("SELECT run_uuid, status FROM runs")
            rows = dict(cur.fetchall())
            cur.execute("SELECT count(*) FROM metrics WHERE key LIKE 'grad_norm/%%'")
            (points,) = cur.fetchone()
    con.close()
    assert rows == {run.info.run_id: "FINISHED" for run in team_runs.values()}
    assert points == sum(len(grad_norm_keys(run)) * len(STEPS) for run in team_runs.values())


@pytest.mark.parametrize("credentials", [None, (ADMIN, "wrong")], ids=["none", "wrong"])
def test_the_server_refuses_requests_without_valid_credentials(team_server, credentials):
    import base64

    team_server.wait_until_healthy()
    request = urllib.request.Request(team_server.url + "/api/2.0/mlflow/experiments/search",
                                     data=b'{"max_results": 10}', method="POST",
                                     headers={"Content-Type": "application/json"})
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
