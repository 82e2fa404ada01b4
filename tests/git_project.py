"""Throwaway git copies of this project for tests that drive real DVC (and a bare "origin")."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment for a subprocess: this venv first, no telemetry, no AWS profile."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": "", **GIT_ID}
    for key in ("MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT", "GITHUB_STEP_SUMMARY",
                "GITHUB_EVENT_NAME", "GITHUB_BASE_REF", "GITHUB_REF_NAME", "GITHUB_ACTIONS"):
        env.pop(key, None)
    empty = Path(tempfile.gettempdir()) / "minibert-tests-empty-aws-config"
    empty.touch()  # credentials from the environment only, never a profile of the machine
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    return {**env, **(extra or {})}


def sh(cwd: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=run_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def project_copy(dest: Path) -> Path:
    """The project's files as git sees them (tracked + untracked, not ignored), in a fresh git repo
    on branch main."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
