"""bench/gpu_check.py and bench/gpu_summary.py on the CPU (the GPU check's Python, run as the shell script
runs it: `python -m` from a project folder), on a tiny workspace: every step ends with its results file
and the figures a CPU must give (kernels on the input's device, a bit-exact resume, no CUDA syncs to count)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from tiny_project import ROOT, make_workspace, stage


def module(root, name: str, *args: str) -> str:
    # the code a GPU takes; one thread: two OpenMP threads on a busy 2-core machine can wait on each other for minutes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINIBERT_PORTABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A tiny workspace, the pretrain stage's book run into W/runs/book as the shell script lays it out, then
    the params, env, diag and weights steps and the summary."""
    root = make_workspace(tmp_path_factory.mktemp("gpu-check"), train={"max_steps": 3, "checkpoint_every": 0})
    w = root / ".gpu-audit-work"
    book = w / "runs/book"
    book.mkdir(parents=True)
    module(root, "gpu_check", "params", str(w / "params-book.yaml"), "train.device=cpu", "train.batch_size=8",
           "tracking.enabled=false")
    stage(root, "pretrain", "--params", str(w / "params-book.yaml"), "--models", str(book / "models"),
          "--metrics", str(book / "metrics"), "--plots", str(book / "plots"), "--checkpoints", str(book / "ckpt"))
    (w / "env.json").write_text(module(root, "gpu_check", "env", "cpu"))
    module(root, "gpu_check", "diag", str(w), "cpu", "1")
    module(root, "gpu_check", "weights", str(w), str(book / "models"), "cpu")
    out = root / "out"
    out.mkdir()
    module(root, "gpu_summary", str(w), str(out), "cpu")
    return root, w, out


def test_params_sets_the_keys_and_keeps_the_rest(checked):
    root, w, _ = checked
    params, given = (yaml.safe_load((p).read_text()) for p in (w / "params-book.yaml", root / "params.yaml"))
    assert params["train"] == {**given["train"], "device": "cpu", "batch_size": 8}
    assert params["tracking"] == {**given["tracking"], "enabled": False} and params["model"] == given["model"]


def test_env_and_missing(checked):
    root, w, _ = checked
    env = json.loads((w / "env.json").read_text())
    assert env["cuda_available"] is False and env["torch"] and env["numpy"][0].isdigit()
    assert module(root, "gpu_check", "missing").strip() == ""  # this venv has every dependency of the stages


def test_diag_on_the_cpu(checked):
    _, w, _ = checked
    diag = json.loads((w / "diag.json").read_text())
    assert diag["data_devices"] == ["cpu"]
    assert diag["host_syncs_mb4"] == diag["host_syncs_mb1"] == diag["host_syncs_fit_log_every_1"] == "cuda only"
    dispatch = {k: v for k, v in diag.items() if k.startswith("dispatch ")}
    assert len(dispatch) == 5 and set(dispatch.values()) == {"cpu"}, dispatch
    assert diag["checkpoint_resume"]["bit_exact"] is True, diag["checkpoint_resume"]
    assert diag["checkpoint_resume"]["resumed_run_steps"] == [4, 5, 6]  # 6 steps, a checkpoint every 3: a real resume
    assert diag["checkpoint_resume"]["resumed_optimizer_state"] == ["exp_avg:cpu", "exp_avg_sq:cpu", "step:cpu"]


def test_weights_on_the_cpu(checked):
    _, w, _ = checked
    weights = json.loads((w / "weights.json").read_text())
    assert weights["encode_cpu_vs_device_max_abs"] == 0.0  # the same weights on the same device
    assert len(weights["pyfunc_fill_mask_on_cpu_model"]) == 3
    assert weights["pyfunc_encode_on_device_model (expect: 4 tokens; inputs built on the model's device)"] == 6


def test_summary_reports_the_run_and_the_checks(checked):
    _, w, out = checked
    summary = json.loads((out / "summary.json").read_text())
    train = json.loads((w / "runs/book/metrics/train.json").read_text())
    assert summary["runs"]["book"]["train"] == train and summary["device"] == "cpu"
    assert summary["diag"]["checkpoint_resume"]["bit_exact"] is True and summary["env"]["cuda_available"] is False
    md = (out / "summary.md").read_text()
    assert f"| book | cpu | {train['precision']} | 8/default | {train['steps']} |" in md
