"""The view a user opens: experiment tags the MLflow UI reads, checked against the installed UI's
own bundle, and (when Chromium is installed) the page a real `mlflow server` renders for the URL."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from minibert.config import TrackingConfig, flatten, load_config
from minibert.tracking import view
from minibert.tracking.runs import start_run, ui_url
from minibert.tracking.store import tracking_uri

try:
    from tests.mlflow_server import start_mlflow_server, stop_mlflow_server
    from tests.tiny_project import ROOT
except ImportError:  # plain `pytest` without the repo root on sys.path
    from mlflow_server import start_mlflow_server, stop_mlflow_server
    from tiny_project import ROOT

BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
# Column ids, written out as the UI's own column picker stores them (metrics.`key`).
WANTED_COLUMNS = ["metrics.`valid_mlm_loss`", "metrics.`mlm_loss`", "metrics.`nsp_loss`", "metrics.`pairs_per_sec`",
                  "params.`train.lr`", "params.`train.max_steps`", "params.`model.num_layers`", "params.`model.hidden`"]


@pytest.fixture
def local(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def saved_view(tags: dict) -> dict:
    """The saved view's envelope and state, checked the way the UI parses them (53787 in its bundle)."""
    envelope = json.loads(tags["mlflow.sharedViewState.minibert-compare"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    assert isinstance(envelope["state"], str)
    return {**envelope, "state": json.loads(envelope["state"])}


def test_new_experiment_opens_as_training_runs_with_the_saved_view(local):
    start_run(TrackingConfig(experiment="view-13"), local).close()
    exp = MlflowClient(tracking_uri(local)).get_experiment_by_name("view-13")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    state = saved_view(exp.tags)["state"]
    assert state["selectedColumns"][0] == "metrics.`valid_mlm_loss`"  # the held-out figure first
    assert set(WANTED_COLUMNS) <= set(state["selectedColumns"]) and state["columnOrder"] == state["selectedColumns"]
    assert not any("url" in c or "probe" in c for c in state["selectedColumns"])


def test_existing_experiment_gains_the_view_and_keeps_its_kind(local):
    client = MlflowClient(tracking_uri(local))
    exp_id = client.create_experiment("view-7", tags={"mlflow.experimentKind": "genai_development",
                                                      "mlflow.sharedViewState.minibert-compare": "{}"})
    start_run(TrackingConfig(experiment="view-7"), local).close()
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "genai_development"  # a user's choice stays
    assert "metrics.`valid_mlm_loss`" in saved_view(tags)["state"]["selectedColumns"]  # a stale view is rewritten


def test_the_installed_ui_reads_these_names():
    """The URL and tags rely on the MLflow UI's JS: fail when an upgrade drops one of its names."""
    bundle = "".join(p.read_text(errors="replace") for p in BUNDLE.glob("*.js"))
    for needle in ('"mlflow.sharedViewState."', '"viewStateShareKey"', 'get("workflowType")',
                   'MACHINE_LEARNING="machine_learning"', '"mlflow.experimentKind"',
                   'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"', '"compareRunsMode"',
                   '"/experiments/:experimentId/runs"', '"selectedColumns","columnOrder"', '"chartsSearchFilter"',
                   'I=(e,t)=>e+".`"+t+"`"'):  # how a column id is built: metrics.`key`
        assert needle in bundle, needle
    url = view.runs_url("http://127.0.0.1:5000", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=minibert-compare"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_a_real_browser_shows_the_runs_table(tmp_path, monkeypatch):
    from scripts.ui_check import problems, render

    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env, capture_output=True)
    (tmp_path / "srv").mkdir()
    uri, server = start_mlflow_server(tmp_path / "srv")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        params = repo / "params.yaml"
        for lr, dvc_name in ((None, None), (0.002, None), (0.0005, "odd-exp-37")):
            if lr is not None:
                params.write_text(params.read_text().replace("  lr: 0.001\n", f"  lr: {lr}\n"))
            if dvc_name:
                monkeypatch.setenv("DVC_EXP_NAME", dvc_name)
            with start_run(TrackingConfig(experiment="minibert"), repo, params=flatten(load_config(params)),
                           params_file=params) as t:
                t.log_metrics({"valid_mlm_loss": 6.5 + (lr or 0.001) * 100})
        url = ui_url(TrackingConfig(experiment="minibert"), repo, uri)
        dom = render(url, tmp_path / "runs.png")
    finally:
        stop_mlflow_server(server)
    assert problems(dom, ["baseline", "lr=0.002", "odd-exp-37"]) == []
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    assert problems(dom, ["never-made-run"]) == ["run 'never-made-run'"]  # the check itself can fail
