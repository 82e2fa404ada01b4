"""The pretrain stage against a real `mlflow server`: fail fast when it is down, survive its death."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server
from tiny_project import ROOT, make_workspace

pytestmark = pytest.mark.slow


def run_stage(root, uri, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "stages.pretrain", "--params", "params.yaml"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path):
    root = make_workspace(tmp_path, tracking=True)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = run_stage(root, uri)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.time() - t0 < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and lines[0].startswith("error: pretrain:")
    assert not (root / "models").exists()


def test_server_killed_mid_run_training_goes_on(tmp_path):
    root = make_workspace(tmp_path / "ws", train={"max_steps": 400, "checkpoint_every": 0}, tracking=True)
    (tmp_path / "srv").mkdir()
    uri, server = start_mlflow_server(tmp_path / "srv")
    try:
        proc = run_stage(root, uri)
        while "pretrain: training steps" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
        stop_mlflow_server(server, signal.SIGKILL)  # the server dies mid-run
        out, err = proc.communicate(timeout=300)
    finally:
        stop_mlflow_server(server)
    assert proc.returncode == 0, err
    assert f"MLflow at {uri} is not answering" in err and "buffering" in err  # a warning names the server
    curve = pd.read_csv(root / "plots/train_loss.csv")
    assert list(curve["step"]) == list(range(1, 401))  # every step kept locally
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == 400


def test_logged_encoder_round_trips_through_mlflow(tmp_path):
    """mlflow.pytorch.load_model("runs:/<id>/model") is a working encoder, for any batch shape (pretrain's run,
    where the publish stage logs it)."""
    import mlflow
    import torch
    from safetensors.numpy import load_file
    from tiny_project import stage

    from minibert.model.bert import load_pretrained

    root = make_workspace(tmp_path, tracking=True)
    for name in ("pretrain", "evaluate", "publish"):
        stage(root, name)
    run_id = json.loads((root / "metrics/train.json").read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    bert, _ = load_pretrained(root / "models")
    batch = load_file(str(root / "data/pairs/valid.safetensors"))
    for n in (1, 7):  # other batch sizes and lengths than the logged example
        t = int(batch["valid_lens"][:n].max())
        args = [torch.from_numpy(batch[k][:n, :t]).long() for k in ("token_ids", "segments")]
        args.append(torch.from_numpy(batch["valid_lens"][:n]).long())
        with torch.no_grad():
            torch.testing.assert_close(loaded(*args), bert.encode(*args), atol=1e-5, rtol=1e-5)
