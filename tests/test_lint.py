"""The project passes its own lint config, and the pre-commit config is valid and runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_passes_on_the_whole_tree():
    r = run(sys.executable, "-m", "ruff", "check", ".")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_ruff_config_catches_an_unused_import(tmp_path):
    """The config is live (not an empty selection): a module with an unused import fails it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    r = run(sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert r.returncode == 1 and "F401" in r.stdout


def test_pre_commit_config_is_valid_and_names_ruff_and_dvcs_hooks():
    r = run(sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / ".pre-commit-config.yaml").read_text()
    for entry in ("ruff check", "dvc git-hook pre-commit", "dvc git-hook pre-push", "dvc git-hook post-checkout"):
        assert f"entry: {entry}" in text, entry
