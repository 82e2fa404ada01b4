"""Is the committed dvc.lock current against the code and params.yaml? `python3 -m ci.lockcheck DIR`.

Run it on a throwaway copy of the repository (it reproduces the data stages there, which rewrites
dvc.lock). Training figures differ between CPUs, so only what is exact anywhere is checked:
- the data stages (download, tokenize, pairs) are rerun on the real WikiText-2 (`MINIBERT_DATA`) and
  their new dvc.lock entries must equal the committed ones, output hashes included;
- every other stage must show, in `dvc status`, at most outputs that are not there (nothing was
  trained): a changed dep, param or command, or a committed metric that differs from its lock entry,
  means dvc.lock was not regenerated with the change.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

DATA_STAGES = ("download", "tokenize", "pairs")
FIX = "run `make repro` and commit dvc.lock (with metrics/ and plots/) together with the change"


def dvc(root: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent  # the stages' `python` is this venv's, too
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": "",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([str(bin_dir / "dvc"), *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def lock_stages(text: str) -> dict:
    return (yaml.safe_load(text) or {}).get("stages", {})


def data_mismatches(committed: dict, fresh: dict) -> list[str]:
    """One line per data stage whose rerun lock entry differs from the committed one."""
    problems = []
    for stage in DATA_STAGES:
        old, new = committed.get(stage), fresh.get(stage)
        if old is None:
            problems.append(f"{stage}: not in the committed dvc.lock")
            continue
        for field in sorted(set(old) | set(new or {})):
            if old.get(field) != (new or {}).get(field):
                what = {"outs": "outputs (hashes)", "deps": "deps (code or inputs)"}.get(field, field)
                problems.append(f"{stage}: {what} differ from the committed dvc.lock")
    return problems


def outs_by_storage(dvc_yaml: dict) -> tuple[set[str], set[str]]:
    """(cached, git-tracked) output paths. `cache: false` ones are left to git: the baseline commits
    them. Cached ones (data/, models/) live in the DVC cache and remote, never in git."""
    cached, tracked = set(), set()
    for stage in dvc_yaml.get("stages", {}).values():
        for section in ("outs", "metrics", "plots"):
            for out in stage.get(section, []):
                path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                (tracked if (opts or {}).get("cache") is False else cached).add(path)
    return cached, tracked


def status_problems(status: dict, dvc_yaml: dict) -> list[str]:
    """From `dvc status --json` after the data stages: only absent cached files (the trained model,
    as an output or as a later stage's dep) are expected; anything else means dvc.lock is stale."""
    cached, _ = outs_by_storage(dvc_yaml)
    problems = []
    for stage, entries in sorted(status.items()):
        if stage in DATA_STAGES:
            continue
        for entry in entries:
            if isinstance(entry, str):  # "always changed", "changed checksum", ...
                problems.append(f"{stage}: {entry}")
                continue
            for kind, items in entry.items():
                if isinstance(items, dict):
                    items = {p: v for p, v in items.items()
                             if not (p in cached and v in ("deleted", "not in cache"))}
                    if items:
                        problems.append(f"{stage}: {kind}: "
                                        + ", ".join(_describe(p, v) for p, v in sorted(items.items())))
                else:
                    problems.append(f"{stage}: {kind}: {items}")
    return problems


def _describe(path: str, value) -> str:
    if isinstance(value, dict):  # params: {"params.yaml": {"train.lr": "modified"}}
        return ", ".join(f"{path} {key} {state}" for key, state in sorted(value.items()))
    return f"{path} {value}"


def check(root: Path) -> list[str]:
    """Reproduce the data stages in `root` (a disposable copy) and list how dvc.lock is stale."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return ["dvc.lock is not committed"]
    committed = lock_stages(lock.read_text())
    dvc(root, "repro", "pairs")
    problems = data_mismatches(committed, lock_stages(lock.read_text()))
    status = json.loads(dvc(root, "status", "--json") or "{}")
    return problems + status_problems(status, yaml.safe_load((root / "dvc.yaml").read_text()))


def message(problems: list[str]) -> str:
    return "dvc.lock is stale against the code and params.yaml: " + "; ".join(problems) + f". Fix: {FIX}."


if __name__ == "__main__":
    found = check(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    if found:
        print(f"error: {message(found)}", file=sys.stderr)
        raise SystemExit(1)
    print("dvc.lock is current")
