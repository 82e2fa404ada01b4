"""Open the URL `make ui` prints in headless Chromium against a real `mlflow server` and check the
page: the training-runs table with the saved view, every run's name and the valid_mlm_loss column.

    python -m scripts.ui_check                        # the project's mlflow.db, experiment minibert
    python -m scripts.ui_check --screenshot runs.png  # also save what Chromium rendered

Needs `chromium` (Debian: apt-get install chromium); exits 2 when it is missing, 1 when a check fails.
"""
from __future__ import annotations

import argparse
import html
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=15000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(url: str, screenshot: Path | None = None, timeout_s: float = 180.0) -> str:
    """The DOM of `url` once the UI's JS has run (Chromium's virtual time lets its requests finish)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="ui-check-") as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True,
                             timeout=timeout_s, check=True).stdout
        if screenshot is not None:
            subprocess.run([exe, *flags, f"--screenshot={Path(screenshot).resolve()}", url],
                           capture_output=True, timeout=timeout_s, check=True)
    return dom


def problems(dom: str, run_names: list[str]) -> list[str]:
    """What the page lacks: the saved view, the held-out column, each run's name."""
    from minibert.tracking import view

    wanted = {f"saved view {view.VIEW_NAME!r}": view.VIEW_NAME, "column valid_mlm_loss": ">valid_mlm_loss<",
              **{f"run {n!r}": f">{html.escape(n, quote=False)}<" for n in run_names}}
    return [what for what, text in wanted.items() if text not in dom]


def serve(db: Path, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """`mlflow server` over the sqlite file `db` on 127.0.0.1:`port`, healthy."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{db.resolve()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mlflow server on port {port} did not come up")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group: its job-queue workers too, which may outlive the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=Path("mlflow.db"))
    ap.add_argument("--experiment", default="minibert")
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args()
    if chromium() is None:
        print("ui-check: chromium not found (apt-get install chromium); nothing checked", file=sys.stderr)
        return 2
    from minibert.config import TrackingConfig
    from minibert.tracking.runs import list_runs, ui_url

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.db.resolve()}"
    names = list(list_runs(TrackingConfig(experiment=args.experiment), Path("."))["run_name"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(args.db, port)
    try:
        url = ui_url(TrackingConfig(experiment=args.experiment), Path("."), f"http://127.0.0.1:{port}")
        missing = problems(render(url, args.screenshot), names)
    finally:
        stop(server)
    print(f"ui-check: {url}: " + (f"missing {', '.join(missing)}" if missing else f"{len(names)} runs shown"))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
