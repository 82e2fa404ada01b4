"""The door to MLflow: importing it, where a project's runs are stored, and a client that fails fast.

Every module of the tracking room reaches mlflow through `mlflow_module()` (telemetry off, short HTTP
retries) and opens clients with `connect()`, so an unreachable server costs seconds and one line.
"""
from __future__ import annotations

import os
import ssl
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from minibert.errors import MinibertError

PROBE_TIMEOUT_S = 3.0
STORE_LOCK_WAIT_S = 120.0  # creating and migrating a new sqlite store takes seconds; then give up waiting


def mlflow_module():
    """Import mlflow on first use, with telemetry off and HTTP retries short.

    MLflow's client retries a dead server for minutes by default; our own buffering is the
    retry, so one quick retry per call is enough. `setdefault` lets a user override both.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


@contextmanager
def fluent_uris(uri: str):
    """MLflow's fluent API (log_model, register_model) pointed at `uri` for one call, then put back.

    `mlflow.set_tracking_uri`/`set_registry_uri` also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    os.environ for subprocesses; left there, a later run of this process (`tracking_uri` reads the
    variable first) or a subprocess it starts would talk to this run's store."""
    mlflow = mlflow_module()
    from mlflow.tracking import _model_registry, _tracking_service

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def project_root(path: Path) -> Path:
    """The repository a run's local store belongs to. DVC runs `exp run --temp` and queued
    experiments in `<repo>/.dvc/tmp/exps/...`: their runs belong in `<repo>/mlflow.db`, not in a
    folder that is deleted when the experiment ends."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(path).resolve()


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else an sqlite file at the project root (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root)}/mlflow.db"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when an HTTP server answers at `uri` (any status), else the reason it does not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: auth or routing problems surface from MLflow itself
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None if isinstance(reason, ssl.SSLError) else str(reason)  # TLS answered: MLflow decides

def one_line(e: BaseException) -> str:
    """An exception as one line (MLflow's messages span many)."""
    return " ".join(str(e).split()) or type(e).__name__


def connect(uri: str):
    """A client for `uri`, failing in seconds with one line when the server is not there."""
    if is_http(uri) and (why := reachable(uri)) is not None:
        raise MinibertError(f"MLflow server {uri} is unreachable ({why}); start it, fix "
                            "MLFLOW_TRACKING_URI, or set tracking.enabled: false in params.yaml")
    return store_client(uri)


class StoreBusy(Exception):
    """Another process held the store's lock past `STORE_LOCK_WAIT_S`."""


@contextmanager
def store_lock(uri: str):
    """An exclusive flock on `<db>.lock` beside an sqlite store, held while a client opens it: opening
    creates or upgrades the schema (MLflow's migrations), which two processes on a new file would run
    at once ("duplicate column name"). Every minibert process takes it; other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as f:
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while True:  # bounded: a hung process holding the lock must not hang every training
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(f"{lock} held by another process for {STORE_LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.05)
        yield


def store_client(uri: str, registry: bool = False):
    """An MlflowClient for `uri` (and its registry), the store created or upgraded under `store_lock`."""
    with store_lock(uri):
        return mlflow_module().MlflowClient(uri, registry_uri=uri if registry else None)


def store_trouble(e: BaseException) -> bool:
    """The database under the store failed (sqlite locked, schema migrations colliding, a bad file),
    not a request MLflow refused."""
    if isinstance(e, StoreBusy):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    db = {"OperationalError", "DatabaseError", "IntegrityError", "ProgrammingError"}
    return bool(names & db) or any(f"{n}:" in str(e) or f"{n})" in str(e) for n in db)  # MLflow may wrap it
