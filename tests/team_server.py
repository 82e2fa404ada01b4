"""A team's MLflow server for tests, all real parts on 127.0.0.1: a throwaway PostgreSQL cluster (the
run store and the auth store), `moto_server` as the S3 artifact store, and `mlflow server
--app-name basic-auth` in front of both. docs/team-tracking.md gives the same setup for real use.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.mlflow_server import free_port, stop_mlflow_server
from tests.s3_server import S3Server, start_s3_server, stop_s3_server

ADMIN, ADMIN_PASSWORD = "admin", "admin-pass-7f3a"


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def createdb(self, name: str) -> None:
        subprocess.run(_as_pg_user([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", "postgres", name]), check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(_as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    p = subprocess.run(_as_pg_user(cmd), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({p.returncode}): {p.stdout[-1500:]}{p.stderr[-1500:]}")


def start_postgres() -> Postgres:
    """A fresh cluster on a free port, trust auth on 127.0.0.1 only (a test fixture, not a deployment:
    docs/team-tracking.md sets a password). Its folder is its own temp dir, owned by the account that
    runs it (pytest's temp dirs are private to the test user)."""
    b = pg_bin()
    assert b is not None, "no PostgreSQL binaries under /usr/lib/postgresql"
    tmp, port = Path(tempfile.mkdtemp(prefix="minibert-pg-")), free_port()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
    data = tmp / "data"
    _run([str(b / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
    _run([str(b / "pg_ctl"), "-D", str(data), "-l", str(tmp / "pg.log"), "-w", "-t", "60", "-o",
          f"-h 127.0.0.1 -p {port} -k {tmp} -c fsync=off", "start"])
    return Postgres(b, data, port)


@dataclass
class TeamServer:
    uri: str
    pg: Postgres
    s3: S3Server
    tmp: Path
    port: int
    proc: subprocess.Popen | None = None
    users: dict[str, str] = field(default_factory=dict)

    def start(self, timeout_s: float = 120.0) -> None:
        """(Re)start `mlflow server` on the same port, stores and artifact bucket."""
        env = {**os.environ, **self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
               "MLFLOW_AUTH_CONFIG_PATH": str(self.tmp / "basic_auth.ini"),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key-0d4e",  # CSRF of the UI forms; same across restarts
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--backend-store-uri", self.pg.url("mlflow"),
               "--artifacts-destination", "s3://mlflow-artifacts"]
        log = open(self.tmp / "mlflow.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.tmp / 'mlflow.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server at {self.uri} not healthy in {timeout_s:.0f} s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            stop_mlflow_server(self.proc)
            self.proc = None

    def add_user(self, name: str, password: str) -> None:
        """A user made by the admin through MLflow's own auth API (what docs/team-tracking.md shows)."""
        from mlflow.server.auth.client import AuthServiceClient

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        try:
            AuthServiceClient(self.uri).create_user(name, password)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        self.users[name] = password

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        """What a client needs: the URI and its credentials, nothing else (no S3 keys: artifacts go
        through the server)."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password if password is not None else self.users[user]}


def start_team_server(tmp: Path) -> TeamServer:
    pg = start_postgres()
    try:
        pg.createdb("mlflow")
        pg.createdb("mlflow_auth")
        s3 = start_s3_server(tmp)
    except BaseException:
        pg.stop()
        raise
    try:
        s3.make_bucket("mlflow-artifacts")
        # Team members log into each other's experiments (one shared `minibert` experiment), hence EDIT.
        (tmp / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = EDIT\n"
            f"database_uri = {pg.url('mlflow_auth')}\n"
            f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A password check is a PBKDF2 hash (deliberately slow): without the cache every request
            # of three busy clients pays it, and on a loaded machine a run's final flush outlasts
            # the tracker's 30 s close wait.
            "auth_cache_ttl_seconds = 60\n")
        port = free_port()
        server = TeamServer(f"http://127.0.0.1:{port}", pg, s3, tmp, port)
        server.start()
    except BaseException:
        stop_s3_server(s3.proc)
        pg.stop()
        raise
    return server


def stop_team_server(server: TeamServer) -> None:
    server.stop()
    stop_s3_server(server.s3.proc)
    server.pg.stop()
