"""The `minibert` CLI with typer's CliRunner: a real tiny model, a real sqlite MLflow store, real stages."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from minibert.cli import STAGES, app
from minibert.config import ModelConfig, TrackingConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.model.bert import build_model, save_pretrained
from minibert.tracking.runs import start_run

try:
    from tests.tiny_project import ROOT, TINY_MODEL, make_workspace
except ImportError:  # plain `pytest` without the repo root on sys.path
    from tiny_project import ROOT, TINY_MODEL, make_workspace

runner = CliRunner()
VOCAB = Vocab(SPECIALS + tuple(f"w{i}" for i in range(99 - len(SPECIALS))))


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """models/ (tiny BERT) and data/tokens/vocab.txt in a fresh cwd, as the pipeline leaves them."""
    monkeypatch.chdir(tmp_path)
    model = build_model(ModelConfig(**TINY_MODEL), vocab_size=len(VOCAB), seed=0)
    save_pretrained(model, tmp_path / "models", {"vocab_sha256": VOCAB.sha256})
    VOCAB.save(tmp_path / "data/tokens/vocab.txt")
    return model.eval()


def encoding(model, ids, segments) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(torch.tensor([ids]), torch.tensor([segments]), torch.tensor([len(ids)]))[0]  # (T, H)


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in [*STAGES, "encode", "runs"]:
        assert f" {name} " in result.stdout, name
    for name in STAGES:  # the stage script's own options: `minibert NAME` runs `python -m stages.NAME`
        proc = subprocess.run([sys.executable, "-m", "minibert.cli", name, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "--params" in proc.stdout, (name, proc.stderr)


def test_a_stage_outside_the_project_says_where_to_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this checkout's minibert, no stages/
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from minibert.cli import app; app()"
    proc = subprocess.run([sys.executable, "-c", code, "evaluate"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: minibert evaluate: no stages/evaluate.py in")


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "minibert"
    if not exe.exists():
        pytest.skip("package not installed (pip install -e .)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "encode" in proc.stdout


def test_encode_table_and_parquet(checkpoint, tmp_path):
    result = invoke("encode", "w3 W17 w3", "--out", "enc.parquet")
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(tmp_path / "enc.parquet")
    assert list(df["token"]) == ["<cls>", "w3", "w17", "w3", "<sep>"]
    assert list(df["position"]) == [0, 1, 2, 3, 4] and set(df["segment"]) == {0}
    want = encoding(checkpoint, [3, VOCAB.id("w3"), VOCAB.id("w17"), VOCAB.id("w3"), 4], [0] * 5)
    assert df["norm"].to_numpy() == pytest.approx(want.norm(dim=-1).numpy(), rel=1e-5)
    assert df[["v0", "v1", "v2", "v3"]].to_numpy() == pytest.approx(want[:, :4].numpy(), abs=1e-6)
    rows = [line for line in result.stdout.splitlines() if "│" in line and line.split("│")[2].strip()]
    tokens = [line.split("│")[2].strip() for line in rows]  # │ word │ token │ ...; the header uses ┃
    assert tokens == list(df["token"])
    assert f"{df['norm'][2]:.4g}" in rows[2] and f"{df['v3'][2]:.4g}" in rows[2]


def test_encode_pair_segments_and_unknown_word(checkpoint, tmp_path):
    result = invoke("encode", "w5 w6", "--pair", "zebra w7", "--out", "p.parquet")
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(tmp_path / "p.parquet")
    assert list(df["token"]) == ["<cls>", "w5", "w6", "<sep>", "<unk>", "w7", "<sep>"]
    assert list(df["word"])[4] == "zebra"
    assert list(df["segment"]) == [0, 0, 0, 0, 1, 1, 1]
    assert result.stderr.strip().splitlines() == [
        "warning: encode: probe 'input': zebra not in the vocabulary; encoded as <unk>"]
    want = encoding(checkpoint, [3, VOCAB.id("w5"), VOCAB.id("w6"), 4, 1, VOCAB.id("w7"), 4], [0] * 4 + [1] * 3)
    assert df["norm"].to_numpy() == pytest.approx(want.norm(dim=-1).numpy(), rel=1e-5)


def test_encode_errors_are_one_line(checkpoint, tmp_path):
    for args, needle in [(("encode", "w1", "--checkpoint", "nowhere"), "nowhere/bert.json: missing"),
                         (("encode", "  "), "empty sentence"),
                         (("encode", "w1", "--run", "abc", "--checkpoint", "models"), "give one of"),
                         (("encode", "w1", "--run", "abc", "--model", "models:/m@champion"), "give one of"),
                         (("encode", " ".join(["w1"] * 40)), "exceed model.max_len")]:
        result = invoke(*args)
        assert result.exit_code == 1, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: encode:"), result.stderr
        assert needle in result.stderr
    Vocab(VOCAB.tokens + ("extra",)).save(tmp_path / "other.txt")
    result = invoke("encode", "w1", "--vocab", "other.txt", "--out", "x.parquet")
    assert result.exit_code == 1 and "differs from the model's" in result.stderr
    assert not (tmp_path / "x.parquet").exists()


# ---------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating the tables costs seconds); tests use own experiments."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def mlflow_uri(store, monkeypatch):
    uri = f"sqlite:///{store}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def make_runs(store: Path, experiment: str, n: int = 2) -> list[str]:
    ids = []
    for i in range(n):
        with start_run(TrackingConfig(experiment=experiment), store, run_name=f"r{i}") as tracker:
            tracker.log_params({"model.num_layers": 2, "model.hidden": 128, "train.lr": 10.0 ** -(i + 2),
                                "train.max_steps": 50, "train.batch_size": 512, "train.precision": "fp32"})
            tracker.log_metrics({"final_mlm_loss_avg": 7.5 - i, "final_nsp_loss_avg": 0.69,
                                 "valid_mlm_accuracy": 0.125 * (i + 1)})
        ids.append(tracker.run_id)
        time.sleep(0.01)  # distinct start times: the order is by start time
    return ids


def test_runs_lists_newest_first(store, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old, new = make_runs(store, "cli-list")
    result = invoke("runs", "--experiment", "cli-list")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert new in out and old in out and out.index(new) < out.index(old)
    new_row = next(line for line in out.splitlines() if new in line)
    cells = [c.strip() for c in new_row.split("│")]
    assert "0.001" in cells and "6.5" in cells and "0.25" in cells and "fp32" in cells
    assert "-" in cells  # a metric the run lacks (valid_nsp_accuracy)
    one = invoke("runs", "--experiment", "cli-list", "--max", "1").stdout
    assert new in one and old not in one


def test_runs_compare_side_by_side(store, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = make_runs(store, "cli-compare")
    result = invoke("runs", "--experiment", "cli-compare", "--compare", a, b[:8])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if a in line)
    assert b in header and header.index(a) < header.index(b)  # the order given
    row = {c[2]: c for c in ([x.strip() for x in line.split("│")] for line in lines if line.count("│") >= 4)}
    assert row["params.train.lr"][1] == "*" and row["params.train.lr"][3:5] == ["0.01", "0.001"]
    assert row["metrics.final_mlm_loss_avg"][1] == "*"
    assert row["params.model.hidden"][1] == "" and row["params.model.hidden"][3:5] == ["128", "128"]


def test_runs_errors(store, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, _ = make_runs(store, "cli-errors")
    for args, needle in [(("--compare", "0" * 32), "matches no run"),
                         (("--compare",), "--compare takes run ids"),
                         ((a,), "--compare takes run ids")]:
        result = invoke("runs", "--experiment", "cli-errors", *args)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    result = invoke("runs", "--experiment", "never-made")
    assert result.exit_code == 1 and "no runs in experiment 'never-made'" in result.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = invoke("runs")  # no mlflow.db here: say so instead of creating an empty store
    assert result.exit_code == 1 and "no MLflow store" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_encode_from_a_run(checkpoint, store, mlflow_uri, tmp_path):
    with start_run(TrackingConfig(experiment="cli-encode"), store) as tracker:
        for f in ("models/bert.safetensors", "models/bert.json", "data/tokens/vocab.txt"):
            tracker.log_artifact(tmp_path / f, "weights")  # what the pretrain stage logs
    local = invoke("encode", "w8 w9", "--out", "local.parquet")
    for f in ("models/bert.safetensors", "data/tokens/vocab.txt"):
        (tmp_path / f).unlink()  # nothing local: all of it must come from the run
    remote = invoke("encode", "w8 w9", "--run", tracker.run_id, "--out", "run.parquet")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    pd.testing.assert_frame_equal(pd.read_parquet("local.parquet"), pd.read_parquet("run.parquet"))
    result = invoke("encode", "w8", "--run", "f" * 32)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "minibert runs" in result.stderr


# ---------------------------------------------------------------------------- stages through the CLI


def test_stages_through_the_cli(tmp_path, monkeypatch):
    """`minibert pretrain` (2 gloo processes: the stage relaunches itself) then `minibert evaluate`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = make_workspace(tmp_path, train={"max_steps": 3, "batch_size": 13, "checkpoint_every": 0, "devices": 2,
                                           "rdzv_endpoint": f"127.0.0.1:{port}"})
    exe = Path(sys.executable).parent / "minibert"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "minibert.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([*cmd, "pretrain", "--params", "params.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((root / "metrics/train.json").read_text())["world_size"] == 2
    assert "pretrain: 3/3 steps (100%)" in proc.stderr  # plain progress: stderr is not a terminal
    proc = subprocess.run([*cmd, "evaluate", "--params", "params.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((root / "metrics/eval.json").read_text())["examples"] > 0
    proc = subprocess.run([*cmd, "evaluate", "--params", "missing.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: evaluate: missing.yaml"), proc.stderr


# ---------------------------------------------------------------------------- the CI workflow for users


def test_pipeline_workflow_runs_tests_repro_and_diffs():
    """The workflow only prepares the runner; the steps are ci/pipeline.py's (tests/test_ci_pipeline.py)."""
    wf = yaml.safe_load((ROOT / ".github/workflows/pipeline.yml").read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "make ci" in runs
    for needle in ("make test", "dvc repro", "dvc pull", "dvc push", "dvc metrics diff"):
        assert needle not in runs, f"{needle}: belongs in ci/pipeline.py, not the workflow"
    script = (ROOT / "ci/pipeline.py").read_text()
    for needle in ('"make", "install"', '"make", "test"', '"pull"', '"repro"', '"push"', "GITHUB_STEP_SUMMARY",
                   '"diff", "--all", "--json"'):
        assert needle in script, needle
    assert "python3 -m ci.pipeline" in (ROOT / "Makefile").read_text()
    uses = [s.get("uses", "") for s in steps]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    assert any(u.startswith("actions/setup-python") for u in uses)
    assert any(u.startswith("actions/upload-artifact") for u in uses)
def named_runs(root: Path, experiment: str) -> None:
    """Two runs as the pretrain stage names them: the committed params.yaml, then one edited."""
    import shutil

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env, capture_output=True)
    from minibert.config import flatten, load_config

    for lr in (None, 0.002):
        if lr is not None:
            raw = yaml.safe_load((root / "params.yaml").read_text())
            raw["train"]["lr"] = lr
            (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        cfg = flatten(load_config(root / "params.yaml"))
        start_run(TrackingConfig(experiment=experiment), root, params=cfg, params_file=root / "params.yaml").close()
        time.sleep(0.01)


def test_runs_shows_the_names_runs_got(store, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    named_runs(tmp_path, "cli-names")
    out = invoke("runs", "--experiment", "cli-names").stdout
    names = [[c.strip() for c in line.split("│")][2] for line in out.splitlines() if line.count("│") > 4]
    assert names == ["lr=0.002", "baseline"]  # newest first


def test_ui_url_names_the_runs_table(store, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp_id = client.create_experiment("cli-ui")  # made before the view existed: no tags
    client.create_run(exp_id)
    result = invoke("ui-url", "--experiment", "cli-ui", "--base", "http://127.0.0.1:5099/")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (f"http://127.0.0.1:5099/#/experiments/{exp_id}/runs"
                                     "?workflowType=machine_learning&viewStateShareKey=minibert-compare")
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and "mlflow.sharedViewState.minibert-compare" in tags
    chart = invoke("ui-url", "--experiment", "cli-ui", "--chart").stdout.strip()
    assert chart.startswith("http://127.0.0.1:5000/#/") and chart.endswith("&compareRunsMode=CHART")
    result = invoke("ui-url", "--experiment", "never-made-ui")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "never-made-ui" in result.stderr
