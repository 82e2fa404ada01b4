"""A team's tracking server, real parts: PostgreSQL (runs and users), moto S3 (artifacts), `mlflow server
--app-name basic-auth`. Laptop and CI clients log in with credentials from the environment only; their
runs share one experiment; a wrong password is refused in one line and writes nothing; concurrent runs
and a server restart lose no metric point. Skipped (with the reason) without PostgreSQL binaries;
.ci/run installs them, so CI runs these."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny_project import ROOT, make_workspace

from tests.mlflow_server import stop_mlflow_server
from tests.team_server import ADMIN, ADMIN_PASSWORD, pg_bin, start_team_server, stop_team_server

pytestmark = pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL binaries not installed "
                                "(/usr/lib/postgresql/*/bin; apt-get install postgresql)")
EXPERIMENT = "team"
TRAIN_KEYS, VALID_KEYS = ("mlm_loss", "nsp_loss", "pairs_per_sec"), ("valid_mlm_loss", "valid_mlm_accuracy",
                                                                     "valid_nsp_loss", "valid_nsp_accuracy")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the dev extra) talks to PostgreSQL")
    server = start_team_server(tmp_path_factory.mktemp("team"))
    try:
        server.add_user("alice", "alice-laptop-pw-13")
        server.add_user("ci", "ci-runner-secret-99")
        yield server
    finally:
        stop_team_server(server)


def admin(team):
    """An MlflowClient logged in as the admin (credentials in the environment, as MLflow reads them)."""
    import mlflow

    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    return mlflow.MlflowClient(team.uri)


@pytest.fixture(autouse=True)
def _credentials_restored(monkeypatch):
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # admin() sets them: undone after
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


def workspace(path: Path, seed: int, lr: float | None = None) -> Path:
    """A tiny project in git with its params committed; `lr` then edits them uncommitted, as
    `dvc exp run -S train.lr=...` does (the run is then named after the change)."""
    root = make_workspace(path, train={"max_steps": 40, "log_every": 1, "eval_every": 10, "lr": 1e-3},
                          tracking=True, seed=seed)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"].update(experiment=EXPERIMENT, registered_model="", system_metrics_every_s=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env, capture_output=True)
    if lr is not None:
        params["train"]["lr"] = lr
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def popen_pretrain(root: Path, env: dict[str, str]) -> subprocess.Popen:
    """The pretrain stage in `root` with exactly these MLflow variables (nothing inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.Popen([sys.executable, "-m", "stages.pretrain", "--params", "params.yaml"], cwd=root,
                            env={**base, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def points_written(root: Path) -> dict[str, list[int]]:
    """Steps of every curve metric, read from the plot CSVs the stage wrote (the independent count)."""
    out = {}
    for name, keys in (("train_loss.csv", TRAIN_KEYS), ("valid_curve.csv", VALID_KEYS)):
        rows = list(csv.DictReader(open(root / "plots" / name)))
        out.update({k: [int(r["step"]) for r in rows] for k in keys})
    return out


def test_laptop_two_queued_runs_and_ci_share_one_experiment_losing_nothing(team, tmp_path):
    """Three pretrain stages at once: two from a laptop (alice, as a DVC queue would run them) and one
    from CI (its own account, a GitHub Actions-like environment); all land in one experiment with names,
    params, held-out curves and dataset inputs; every point the CSVs hold is stored; artifacts are in S3."""
    clients = {"laptop": (workspace(tmp_path / "laptop", 7), team.env("alice")),
               "laptop-queued": (workspace(tmp_path / "queued", 7, lr=2e-3), team.env("alice")),
               "ci": (workspace(tmp_path / "ci", 13), {**team.env("ci"), "GITHUB_ACTIONS": "true", "CI": "true"})}
    procs = {name: popen_pretrain(root, env) for name, (root, env) in clients.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}:\n{out[-2000:]}\n{err[-3000:]}"
    client = admin(team)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    sent = stored = 0
    for name, (root, _) in clients.items():
        run_id = yaml.safe_load((root / "metrics/train.json").read_text())["mlflow_run_id"]
        run = runs[run_id]
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert run.info.run_name == ("lr=0.002" if name == "laptop-queued" else "baseline"), run.info.run_name
        assert run.data.params["train.max_steps"] == "40"
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train_pairs", "valid_pairs", "vocab"}
        for key, steps in points_written(root).items():
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == steps, (name, key)
            sent, stored = sent + len(steps), stored + len(history)
        assert client.get_metric_history(run_id, "valid_mlm_loss")  # the held-out curve
        assert client.get_metric_history(run_id, "system/process_rss_megabytes")
        assert client.list_artifacts(run_id, "weights")
    assert len(runs) >= 3
    print(f"\nconcurrent runs: {len(clients)}, curve points sent {sent}, stored {stored}")
    assert sent == stored == 3 * (40 * 3 + 4 * 4)
    import boto3

    s3 = boto3.client("s3", endpoint_url=team.s3.endpoint, region_name="us-east-1",
                      aws_access_key_id=team.s3.key_id, aws_secret_access_key=team.s3.secret)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith("weights/bert.safetensors") for k in keys), keys[:5]


def test_wrong_password_is_refused_in_one_line_and_writes_nothing(team, tmp_path):
    client = admin(team)
    exp = client.get_experiment_by_name(EXPERIMENT)
    before = len(client.search_runs([exp.experiment_id])) if exp else 0
    root = workspace(tmp_path / "intruder", 7)
    p = popen_pretrain(root, team.env("alice", password="not-alices-password"))
    out, err = p.communicate(timeout=300)
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused the login of user 'alice'" in lines[0] \
        and "MLFLOW_TRACKING_PASSWORD" in lines[0], err
    client = admin(team)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert (len(client.search_runs([exp.experiment_id])) if exp else 0) == before
    assert not (root / "models").exists() and not (root / "metrics").exists() and not (root / "plots").exists()


def test_server_killed_and_restarted_mid_run_loses_nothing(team, tmp_path, monkeypatch):
    """A run keeps logging while the server is killed (SIGKILL) and comes back on the same port:
    the buffered tracker resends, and every point is stored once."""
    from minibert.config import TrackingConfig
    from minibert.tracking.runs import start_run

    for k, v in team.env("alice").items():
        monkeypatch.setenv(k, v)
    tracker = start_run(TrackingConfig(experiment=EXPERIMENT, registered_model=""), tmp_path, run_name="restart")
    stop, step = threading.Event(), [0]

    def train():  # 3 points every 50 ms, like a fast training's log_every: 1
        while not stop.is_set():
            step[0] += 1
            tracker.log_metrics({k: 1.0 / step[0] for k in TRAIN_KEYS}, step=step[0])
            time.sleep(0.05)

    t = threading.Thread(target=train)
    t.start()
    try:
        time.sleep(2)
        stop_mlflow_server(team.proc, signal.SIGKILL)
        team.proc = None
        at_kill = step[0]
        time.sleep(3)
        team.start()  # same port, same PostgreSQL and bucket
        time.sleep(3)
    finally:
        stop.set()
        t.join()
    client = admin(team)

    def stored_now():
        return {k: sorted(m.step for m in client.get_metric_history(tracker.run_id, k)) for k in TRAIN_KEYS}

    # The backlog (a minute of points or more, on a loaded machine) drains at the server's pace; close()
    # waits only 30 s by design, so wait here until the server has it all (or give up after 5 minutes).
    deadline = time.monotonic() + 300
    while sum(map(len, (stored := stored_now()).values())) < 3 * step[0] and time.monotonic() < deadline:
        time.sleep(2)
    tracker.close()
    stored = stored_now()
    sent = 3 * step[0]
    print(f"\nserver restart: killed at step {at_kill}, last step {step[0]}, points sent {sent}, "
          f"stored {sum(map(len, stored.values()))}")
    assert at_kill < step[0] and all(v == list(range(1, step[0] + 1)) for v in stored.values())
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_browser_shows_laptop_and_ci_runs_with_their_datasets(team, tmp_path, monkeypatch):
    """Headless Chromium, logged in as alice (tests/auth_proxy.py adds her Basic header, as a browser
    she logged into does), opens the experiment's saved compare view: the laptop's and CI's runs are
    there, and the Datasets column names each run's train pairs with its own digest. The screenshot
    is tmp_path/team-runs.png (copied into $MINIBERT_SCREENSHOT_DIR when set)."""
    import html
    import shutil

    from minibert.config import TrackingConfig
    from minibert.tracking.runs import ui_url
    from scripts.ui_check import chromium, render
    from tests.auth_proxy import start_auth_proxy

    if chromium() is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does)")
    client = admin(team)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.inputs.dataset_inputs]
    if len(runs) < 2:
        pytest.skip("needs the laptop and CI runs of the test above")
    for k, v in team.env("alice").items():  # ui_url talks to the server named by the environment
        monkeypatch.setenv(k, v)
    base, proxy = start_auth_proxy(team.uri, "alice", team.users["alice"])
    try:
        dom = render(ui_url(TrackingConfig(experiment=EXPERIMENT), tmp_path, base), tmp_path / "team-runs.png")
    finally:
        proxy.shutdown()
    if os.environ.get("MINIBERT_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "team-runs.png", os.environ["MINIBERT_SCREENSHOT_DIR"])
    body = html.unescape(dom.split("<body", 1)[-1])
    text = re.sub(r"<[^>]*>", "", body)  # React splits text nodes with <!-- --> comments
    assert "You are not authenticated" not in body and "alice" in body
    for r in runs:
        assert f">{r.info.run_name}<" in body, r.info.run_name
        train = next(d.dataset for d in r.inputs.dataset_inputs if d.dataset.name == "train_pairs")
        assert f"train_pairs ({train.digest[:8]}" in text, train.digest  # the Datasets cell of this run
