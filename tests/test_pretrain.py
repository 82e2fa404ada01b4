"""run_pretrain's MLflow run ends FINISHED only on success, FAILED on any error, KILLED on a signal (real sqlite)."""
import json
import os
import signal
import time
from dataclasses import field, make_dataclass, replace

import pytest
from tiny_project import make_workspace, popen_stage, stage

from minibert.config import NOT_NUMERIC, ModelConfig, TrainConfig, load_config
from minibert.errors import MinibertError
from minibert.training import pretrain


def statuses(root):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [r.info.status for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])]


def run_in_process(root, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(root / "params.yaml")
    paths = pretrain.Paths(root, root / "data/pairs/train.safetensors", root / "data/tokens/vocab.txt",
                           root / "models", root / "metrics/train.json", root / "plots/train_loss.csv",
                           root / "plots/train_loss.png", root / "checkpoints", root / "params.yaml",
                           valid_pairs=root / "data/pairs/valid.safetensors", valid_curve=root / "plots/valid_curve.csv")
    return pretrain.run_pretrain(cfg.model, cfg.train, cfg.tracking, {"train.max_steps": cfg.train.max_steps}, paths)


def test_success_is_finished(tmp_path, monkeypatch):
    root = make_workspace(tmp_path, train={"max_steps": 3}, tracking=True)
    run_in_process(root, monkeypatch)
    assert statuses(root) == ["FINISHED"]


@pytest.mark.parametrize("precision, passes", [("fp32", 4), ("bf16", 1)])
def test_train_json_says_how_many_passes_auto_made(tmp_path, monkeypatch, precision, passes):
    """micro_batches: auto is 4 passes in fp32 on CPU, 1 in bf16 (memory vs speed, loop.resolve_micro_batches)."""
    root = make_workspace(tmp_path, train={"max_steps": 2, "precision": precision})
    run_in_process(root, monkeypatch)
    m = json.loads((root / "metrics/train.json").read_text())
    assert (m["micro_batches"], m["precision"]) == (passes, {"fp32": "fp32", "bf16": "bfloat16"}[precision])


def test_non_finite_loss_is_failed(tmp_path, monkeypatch):
    root = make_workspace(tmp_path, train={"lr": 1e30, "max_steps": 20}, tracking=True)
    with pytest.raises(MinibertError, match="loss is (nan|inf) at step"):
        run_in_process(root, monkeypatch)
    assert statuses(root) == ["FAILED"]


def test_unexpected_exception_inside_the_loop_is_failed(tmp_path, monkeypatch):
    """A plain RuntimeError (not a MinibertError) raised by the loop's logging hook at step 5."""
    real_fit = pretrain.fit

    def fit_with_a_broken_hook(*args, on_log, **kw):
        def on_log_then_break(rows):
            on_log(rows)
            if rows[-1]["step"] >= 5:
                raise RuntimeError("No space left on device")
        return real_fit(*args, on_log=on_log_then_break, **kw)

    monkeypatch.setattr(pretrain, "fit", fit_with_a_broken_hook)
    root = make_workspace(tmp_path, train={"max_steps": 12}, tracking=True)
    with pytest.raises(RuntimeError, match="No space left"):
        run_in_process(root, monkeypatch)
    assert statuses(root) == ["FAILED"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_killed(tmp_path, signum):
    root = make_workspace(tmp_path, train={"max_steps": 2000, "checkpoint_every": 0}, tracking=True)
    proc = popen_stage(root, "pretrain")
    while "pretrain: training steps" not in proc.stdout.readline():  # the run exists, training has started
        assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "stopped by signal at step" in err, err
    assert statuses(root) == ["KILLED"]


def fingerprint(cfg):
    return pretrain.run_fingerprint(ModelConfig(), cfg, "d" * 64, "v" * 64, 1)


def test_fingerprint_ignores_only_fields_marked_not_numeric():
    base = fingerprint(TrainConfig())
    for change in ({"threads": 1}, {"compile": True}, {"log_every": 7}, {"checkpoint_every": 13},
                   {"nodes": 2, "rdzv_endpoint": "10.0.0.7:29500"}, {"devices": 2}, {"rdzv_id": "x"},
                   {"rdzv_endpoint": "h:1"}, {"max_restarts": 3}):
        assert fingerprint(replace(TrainConfig(), **change)) == base, change
    for change in ({"lr": 0.002}, {"seed": 1}, {"micro_batches": 3}, {"precision": "bf16"}, {"max_steps": 99}):
        assert fingerprint(replace(TrainConfig(), **change)) != base, change


def test_a_new_train_field_is_fingerprinted_unless_marked():
    Newer = make_dataclass("Newer", [("knob", int, field(default=0)),
                                     ("verbosity", int, field(default=0, metadata=NOT_NUMERIC))],
                           bases=(TrainConfig,), frozen=True)
    assert fingerprint(Newer(knob=1)) != fingerprint(Newer(knob=0))
    assert fingerprint(Newer(verbosity=1)) == fingerprint(Newer(verbosity=0))


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "SafetensorError" not in err, err


def test_checkpoints_on_a_full_filesystem_cost_one_warning_and_training_goes_on(tmp_path, small_fs):
    """The user's case: checkpoints/ on a tiny real filesystem (32 kB; one checkpoint is ~60 kB).
    Training runs to the end, outputs written, run FINISHED, and stderr says it in one warning line."""
    fs = small_fs("32k")
    root = make_workspace(tmp_path / "ws", train={"max_steps": 12, "checkpoint_every": 4}, tracking=True)
    proc = stage(root, "pretrain", "--checkpoints", str(fs))
    no_traceback(proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if "checkpoint" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: pretrain: checkpoint of step 4 not saved: cannot write "
                                                   f"{fs}/"), proc.stderr
    assert "No space left on device" in lines[0] and "kB needed" in lines[0]
    assert "pretrain: 12 steps" in proc.stdout and (root / "models/bert.safetensors").is_file()
    assert statuses(root) == ["FINISHED"] and os.listdir(fs) == []


def test_final_outputs_on_a_full_filesystem_stop_with_one_line_and_keep_the_old(tmp_path, small_fs):
    """models/ on a 16 kB filesystem (the weights are ~20 kB): exit 1, one `error: pretrain:` line naming
    the folder and its free space, the old bert.safetensors and every other old output unchanged, no
    temp files, the MLflow run FAILED."""
    fs = small_fs("16k")
    root = make_workspace(tmp_path / "ws", train={"max_steps": 3}, tracking=True)
    (fs / "bert.safetensors").write_bytes(b"old weights")
    for f in ("metrics/train.json", "plots/train_loss.csv"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("old")
    proc = stage(root, "pretrain", "--models", str(fs), check=False)
    no_traceback(proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: pretrain: cannot write {fs}/bert.safetensors: No space left on device (")
    assert "free there" in errors[0]
    assert os.listdir(fs) == ["bert.safetensors"] and (fs / "bert.safetensors").read_bytes() == b"old weights"
    assert [(root / f).read_text() for f in ("metrics/train.json", "plots/train_loss.csv")] == ["old", "old"]
    assert statuses(root) == ["FAILED"]


def test_injected_enospc_at_the_final_writer_keeps_every_old_output(tmp_path, monkeypatch):
    """The plot is written after models/ and the curves: its failure leaves those unreplaced too."""
    import errno

    from minibert.errors import WriteError

    root = make_workspace(tmp_path, train={"max_steps": 3}, tracking=True)
    old = {f: f"old {f}" for f in ("models/bert.safetensors", "models/bert.json", "metrics/train.json",
                                   "plots/train_loss.csv", "plots/valid_curve.csv")}
    for f, text in old.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)

    from matplotlib.figure import Figure

    def full(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"torn PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(WriteError, match="No space left on device"):
        run_in_process(root, monkeypatch)
    assert {f: (root / f).read_text() for f in old} == old
    assert not [p for p in root.rglob(".*.tmp")]
    assert statuses(root) == ["FAILED"]
