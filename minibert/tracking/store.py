"""The door to MLflow: importing it, where a project's runs are stored, and a client that fails fast.

Every module of the tracking room reaches mlflow through `mlflow_module()` (telemetry off, short HTTP
retries) and opens clients with `connect()`, so an unreachable server costs seconds and one line.
"""
from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from minibert.errors import MinibertError

PROBE_TIMEOUT_S = 3.0


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
    return mlflow_module().MlflowClient(uri)
