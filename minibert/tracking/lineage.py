"""Data lineage: a run's train/valid pairs and vocabulary as MLflow dataset inputs.

MLflow's UI lists a run's dataset inputs in the runs table's Datasets column (and filters by them).
Each input here is named after its role (`train_pairs`, `valid_pairs`, `vocab`), its digest is the
file's content hash (so runs on different data never look alike), and its source says where to get
the bytes back: the DVC-tracked path, the md5 `dvc.lock` records for the output holding it, the git
revision and, when the repository has an `origin`, the `dvc get` command that fetches it.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

SOURCE_TYPE = "dvc"
DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters: a prefix of the sha256 hex


@dataclass(frozen=True)
class DataInput:
    name: str       # the role: train_pairs, valid_pairs, vocab
    path: str       # relative to the project root, as dvc.yaml names it
    sha256: str     # content hash of the file
    context: str    # MLflow's input context tag: training / validation / vocabulary


def lock_md5(root: Path, path: str) -> str | None:
    """The md5 `dvc.lock` holds for the stage output that is `path` or a folder above it."""
    lock = Path(root) / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    target = Path(path)
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            out_path = Path(out.get("path", ""))
            if out_path == target or out_path in target.parents:
                return out.get("md5")
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def source(root: Path, path: str) -> dict[str, str]:
    """Where the bytes come from: DVC path, its dvc.lock md5, git revision, and how to fetch them."""
    rev, repo = _git(root, "rev-parse", "HEAD"), _git(root, "remote", "get-url", "origin")
    out = {"path": path, "dvc_lock_md5": lock_md5(root, path) or "", "git_rev": rev or ""}
    if repo and rev:
        out["fetch"] = f"dvc get {repo} {path} --rev {rev}"
    return out


def dataset_inputs(inputs: list[DataInput], root: Path):
    """MLflow `DatasetInput` entities for `inputs`."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=i.name, digest=i.sha256[:DIGEST_CHARS], source_type=SOURCE_TYPE,
                                 source=json.dumps(source(root, i.path), sort_keys=True),
                                 profile=json.dumps({"sha256": i.sha256})),
                         tags=[InputTag("mlflow.data.context", i.context)])
            for i in inputs]


def log_data_inputs(tracker, inputs: list[DataInput], root: Path, attempts: int = 4) -> None:
    """Log `inputs` to the tracker's run (once, at its start); nothing when tracking is off.

    Synchronous, unlike metrics (MLflow takes inputs only while the run is active, so they cannot
    wait in the buffer past its end), hence a few tries: a busy team server can time out one request
    (seen with three runs starting at once). After that it warns and training goes on: the content
    hashes are also the run's tags. MLflow stores a repeated input once."""
    if getattr(tracker, "run_id", None) is None or not hasattr(tracker, "uri"):
        return
    from minibert.tracking.store import mlflow_module

    for attempt in range(1, attempts + 1):
        try:
            mlflow_module().MlflowClient(tracker.uri).log_inputs(tracker.run_id, datasets=dataset_inputs(inputs, root))
            return
        except Exception as e:
            if attempt == attempts or getattr(e, "error_code", None) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
                log.warning("MLflow: could not log the dataset inputs of run %s: %s", tracker.run_id,
                            " ".join(str(e).split())[:300])
                return
            time.sleep(2.0 * attempt)
