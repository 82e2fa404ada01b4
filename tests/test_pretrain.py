"""run_pretrain's MLflow run ends FINISHED only on success, FAILED on any error, KILLED on a signal (real sqlite)."""
import signal
import time
from dataclasses import field, make_dataclass, replace

import pytest

from minibert import pretrain
from minibert.config import NOT_NUMERIC, ModelConfig, TrainConfig, load_config
from minibert.errors import MinibertError
from tiny_project import make_workspace, popen_stage


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
