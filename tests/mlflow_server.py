"""A real `mlflow server` on 127.0.0.1 for tests: start it, wait for /health, stop its process group."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int | None = None,
                        timeout_s: float = 90.0) -> tuple[str, subprocess.Popen]:
    """Start a server with its sqlite store and artifacts under `tmp_path`; same dir + port resumes it."""
    tmp_path = Path(tmp_path)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path.resolve()}/server.db",
           "--artifacts-destination", str(tmp_path.resolve() / "server-artifacts")]
    log = open(tmp_path / f"server-{port}.log", "ab")
    # Own session, so stopping it also stops the workers it forks.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (tmp_path / f"server-{port}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            time.sleep(0.2)
    stop_mlflow_server(proc)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s:.0f} s")


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the server's whole process group (SIGKILL if it lingers); safe to call twice."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    # Workers that outlived the leader share its group id: make sure none is left.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
