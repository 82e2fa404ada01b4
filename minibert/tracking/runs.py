"""Runs in the store: opening (new or resumed) with their names and tags, listing, fetching artifacts
and metrics, the UI's URL, and the pretrain stage's run that evaluate and probe log into."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minibert.config import TrackingConfig
from minibert.errors import MinibertError
from minibert.tracking import auth, view
from minibert.tracking.runinfo import describe_run, hyperparams, run_tags
from minibert.tracking.store import connect, one_line, project_root, store_trouble, tracking_uri
from minibert.tracking.tracker import MlflowTracker, NullTracker, Tracker

log = logging.getLogger(__name__)


def _experiment_id(client, name: str, uri: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # Local stores keep artifacts beside the database, not in ./mlruns of whatever cwd is.
        location = (project_root(root) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=view.experiment_tags())
        except Exception:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise MinibertError(f"MLflow experiment {name!r} at {uri} is deleted; restore it "
                            "(mlflow experiments restore) or set tracking.experiment to another name")
    _set_view_tags(client, exp)
    return exp.experiment_id


def _set_view_tags(client, exp) -> None:
    """Give an experiment made before these tags existed the saved view; keep a kind a user chose."""
    for key, value in view.experiment_tags().items():
        if key not in exp.tags or (key != view.KIND_TAG and exp.tags[key] != value):
            client.set_experiment_tag(exp.experiment_id, key, value)


def ui_url(cfg: TrackingConfig, root: Path, base: str, chart: bool = False) -> str:
    """URL of the experiment's training-runs table (or chart view) in an MLflow UI at `base`;
    (re)writes the experiment's view tags so the URL's saved view exists."""
    uri = tracking_uri(root)
    client = connect(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise MinibertError(f"no experiment {cfg.experiment!r} at {uri}; run the pipeline first (dvc repro)")
    _set_view_tags(client, exp)
    return view.runs_url(base, exp.experiment_id, chart=chart)


def start_run(cfg: TrackingConfig, root: Path, run_id: str | None = None, run_name: str | None = None,
              params: dict[str, Any] | None = None, params_file: Path | None = None) -> Tracker:
    """Open a run: resume `run_id` when given, else a new run in `cfg.experiment` tagged with git
    state. A new run with `params` (the flattened config) logs its hyperparameters and is named and
    described from them and `params_file` (minibert/tracking/runinfo.py)."""
    if not cfg.enabled:
        return NullTracker()
    uri = tracking_uri(root)

    def open_run(client) -> str:
        if run_id is not None:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted":
                raise MinibertError(f"MLflow run {run_id} at {uri} is deleted; restore it or rerun pretrain")
            client.update_run(run_id, status="RUNNING")
            return run_id
        exp_id = _experiment_id(client, cfg.experiment, uri, root)
        tags = run_tags(root)
        name = run_name
        if params is not None:
            described_name, described = describe_run(params, params_file)
            name, tags = run_name or described_name, {**tags, **described}
        return client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    try:
        tracker = MlflowTracker(uri, open_run(connect(uri)))
    except MinibertError:
        raise
    except Exception as e:
        if (line := auth.refusal(e, uri, cfg.experiment)) is not None:
            raise MinibertError(line) from None
        if not store_trouble(e):
            what = f"run {run_id}" if run_id else f"a run in experiment {cfg.experiment!r}"
            raise MinibertError(f"MLflow at {uri}: could not open {what}: {one_line(e)[:300]}") from None
        # A store that cannot be opened now (locked, damaged, being migrated) must not cost the training.
        log.warning("MLflow store %s cannot be opened (%s); training goes on, its tracking data buffered "
                    "in memory and sent once the store opens", uri, one_line(e)[:200])
        tracker = MlflowTracker(uri, None, opener=open_run)
    if params is not None and run_id is None:  # a new run logs its hyperparameters
        tracker.log_params(hyperparams(params))
    return tracker


def list_runs(cfg: TrackingConfig, root: Path, max_results: int = 100):
    """Runs of `cfg.experiment`, newest first: ids, status, times, then metrics./params./tags. columns."""
    import pandas as pd

    uri = tracking_uri(root)
    client = connect(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    base = ["run_id", "run_name", "status", "start_time", "end_time"]
    if exp is None:
        return pd.DataFrame(columns=base)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=max_results)
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
               "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
               "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT}
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else base)


def download_artifacts(run_id: str, artifact_path: str, dest: str | Path, root: Path) -> Path:
    """Copy the artifact folder (or file) `artifact_path` of run `run_id` into `dest`; the local copy's path."""
    uri = tracking_uri(root)
    client = connect(uri)
    try:
        return Path(client.download_artifacts(run_id, artifact_path, str(dest)))
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not fetch {artifact_path!r} of run {run_id} "
                            f"({one_line(e)[:200]}); check the id with `minibert runs`") from None


def pretrain_run_id(train_metrics: str | Path) -> str | None:
    """The MLflow run the pretrain stage opened (`mlflow_run_id` in metrics/train.json), if any:
    evaluate and probe log into it."""
    path = Path(train_metrics)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("mlflow_run_id") or None
    except (json.JSONDecodeError, AttributeError):
        raise MinibertError(f"{path}: not a JSON object; re-run the pretrain stage") from None


def pretrain_run(cfg: TrackingConfig, train_metrics: str | Path, root: Path = Path(".")) -> Tracker:
    """The pretrain stage's run, resumed so evaluate and probe log into it; a `NullTracker` when
    tracking is off or the pretrain recorded no run."""
    run_id = pretrain_run_id(train_metrics) if cfg.enabled else None
    return start_run(cfg, root, run_id=run_id) if run_id else NullTracker()


def run_metrics(run_id: str, root: Path) -> dict[str, float]:
    """The latest value of every metric of run `run_id`."""
    uri = tracking_uri(root)
    try:
        return dict(connect(uri).get_run(run_id).data.metrics)
    except MinibertError:
        raise
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not read run {run_id} ({one_line(e)[:200]}); "
                            "check the id with `minibert runs`") from None
