"""Real MLflow: an sqlite store in a tmp dir, and a real `mlflow server` subprocess on 127.0.0.1."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from mlflow import MlflowClient  # noqa: E402  (tests read back through MLflow's own client)

from minibert.config import TrackingConfig
from minibert.errors import MinibertError
from minibert.tracking.runinfo import run_tags
from minibert.tracking.runs import list_runs, start_run
from minibert.tracking.store import tracking_uri
from minibert.tracking.tracker import MlflowTracker, NullTracker

try:
    from tests.mlflow_server import free_port, start_mlflow_server, stop_mlflow_server
except ImportError:  # plain `pytest` without the repo root on sys.path
    from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server

CFG = TrackingConfig(experiment="exp-13")


class Tiny(torch.nn.Module):
    """Two inputs, two outputs: the shape of BERT's call (tokens + extras → MLM, NSP)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(7, 13)

    def forward(self, x, scale):
        y = self.lin(x) * scale  # (B, 13)
        return y, y.sum(-1)  # (B, 13), (B,)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store per module: creating its tables costs seconds; tests use own experiments."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def local(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store


@pytest.fixture
def cfg(request):
    return TrackingConfig(experiment=request.node.name)


class Server:
    """The module's one server; a test may kill it and restart it on the same port and store."""

    def __init__(self, path: Path):
        self.path = path
        self.uri, self.proc = start_mlflow_server(path)
        self.port = int(self.uri.rsplit(":", 1)[1])

    def restart(self) -> None:
        self.proc = start_mlflow_server(self.path, port=self.port)[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    stop_mlflow_server(srv.proc)


@pytest.fixture
def server(mlflow_server):
    return mlflow_server.uri


def _log_steps(tracker, steps, offset=0.0):
    for s in steps:
        tracker.log_metrics({"loss": 10.0 / (s + 1) + offset, "mlm": float(s)}, step=s)


def _steps(client, run_id, key="loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tracking_uri_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:9"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri(Path("sub"))
    assert uri == f"sqlite:///{(tmp_path / 'sub').resolve()}/mlflow.db"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()


def test_null_tracker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = tmp_path
    t = start_run(TrackingConfig(enabled=False), local)
    assert isinstance(t, NullTracker) and t.run_id is None
    with t:
        t.log_params({"a": 1}); t.log_metrics({"x": 1.0}, step=3); t.set_tags({"k": "v"})
        t.log_artifact(local / "missing.txt"); t.log_model(Tiny())
        assert t.last_step("x") is None
    t.close(); t.close()
    assert list(local.iterdir()) == []  # no database, no artifact folder


def test_sqlite_run_round_trip_and_resume(local, cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-odd-37")
    art = tmp_path / "notes.txt"
    art.write_text("thirteen\n")
    with start_run(cfg, local, run_name="r13") as t:
        assert isinstance(t, MlflowTracker)
        t.log_params({"model.hidden": 13, "train.lr": 0.001})
        _log_steps(t, range(7))
        t.set_tags({"input_hash": "abc99"})
        t.log_artifact(art, "docs")
        assert t.last_step("loss") == 6 and t.last_step("nope") is None
        run_id = t.run_id
    client = MlflowClient(tracking_uri(local))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r13"
    hist = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(7))
    assert {m.step: m.value for m in hist} == {s: 10.0 / (s + 1) for s in range(7)}
    assert run.data.params == {"model.hidden": "13", "train.lr": "0.001"}
    assert run.data.tags["input_hash"] == "abc99" and run.data.tags["dvc_exp_name"] == "exp-odd-37"
    assert [f.path for f in client.list_artifacts(run_id, "docs")] == ["docs/notes.txt"]
    assert Path(client.download_artifacts(run_id, "docs/notes.txt", str(tmp_path))).read_text() == "thirteen\n"
    # artifacts of the local store live beside the database, not in the cwd
    assert (local / "mlartifacts").is_dir()

    t2 = start_run(cfg, local, run_id=run_id)
    assert t2.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    first = t2.last_step("loss") + 1
    _log_steps(t2, range(first, first + 3))
    t2.close("FAILED"); t2.close()
    assert _steps(client, run_id) == list(range(10))
    assert client.get_run(run_id).info.status == "FAILED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_unknown_run_is_one_line_error(local, cfg, tmp_path):
    start_run(cfg, local).close()  # the store exists; the run does not
    with pytest.raises(MinibertError) as e:
        start_run(cfg, local, run_id="0123456789abcdef0123456789abcd99")
    assert "0123456789abcdef0123456789abcd99" in str(e.value) and "\n" not in str(e.value)


def test_context_manager_marks_failed_and_list_runs(local, cfg, tmp_path):
    with pytest.raises(RuntimeError):
        with start_run(cfg, local) as t:
            failed = t.run_id
            raise RuntimeError("boom")
    time.sleep(0.01)  # distinct start times for the ordering check
    with start_run(cfg, local) as t:
        t.log_metrics({"acc": 0.5}, step=1)
        ok = t.run_id
    df = list_runs(cfg, local)
    assert list(df["run_id"]) == [ok, failed]
    assert list(df["status"]) == ["FINISHED", "FAILED"]
    assert df.loc[0, "metrics.acc"] == 0.5
    assert list_runs(TrackingConfig(experiment="none-7"), local).empty


def test_run_tags_record_git_state_and_the_dvc_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    state_keys = {"mlflow.source.git.commit", "mlflow.source.git.branch", "git_dirty", "dvc_exp_name"}
    state = lambda: {k: v for k, v in run_tags(tmp_path).items() if k in state_keys}  # noqa: E731
    assert state() == {}  # not a repository: nothing, no error
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, env=env,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "c")
    tags = state()
    assert tags == {"mlflow.source.git.commit": git("rev-parse", "HEAD"),
                    "mlflow.source.git.branch": git("symbolic-ref", "--short", "HEAD"), "git_dirty": "false"}
    (tmp_path / "f.txt").write_text("b")
    monkeypatch.setenv("DVC_EXP_NAME", "e13")
    assert state() == {**tags, "git_dirty": "true", "dvc_exp_name": "e13"}


def _assert_round_trip(uri, run_id, model, example):
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    inputs = {k: torch.as_tensor(v) for k, v in example.items()}
    model.eval()  # the exported graph is already inference-only (it refuses .eval())
    with torch.no_grad():
        for a, b in zip(model(*inputs.values()), loaded(*inputs.values())):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert [i.name for i in info.signature.inputs.inputs] == list(example)


def _example(rng):
    return {"x": rng.standard_normal((3, 7)).astype(np.float32),
            "scale": rng.standard_normal((3, 1)).astype(np.float32)}


def test_log_model_round_trip_sqlite(local, cfg, tmp_path):
    torch.manual_seed(13)
    model, example = Tiny(), _example(np.random.default_rng(7))
    with start_run(cfg, local) as t:
        t.log_model(model, example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        t.log_metrics({"after": 1.0}, step=2)  # the run stays usable after log_model
        run_id = t.run_id
    client = MlflowClient(tracking_uri(local))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id, "after") == [2]
    _assert_round_trip(tracking_uri(local), run_id, model, example)


def test_server_run_round_trip(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    assert tracking_uri(tmp_path) == server
    art = tmp_path / "table.csv"
    art.write_text("a,b\n1,2\n")
    torch.manual_seed(99)
    model, example = Tiny(), _example(np.random.default_rng(37))
    with start_run(CFG, tmp_path) as t:
        t.log_params({"model.layers": 2})
        _log_steps(t, range(7))
        t.set_tags({"stage": "pretrain"})
        t.log_artifact(art)
        t.log_model(model, example, pip_requirements=["torch"])
        run_id = t.run_id
    with start_run(CFG, tmp_path, run_id=run_id) as t:  # evaluate logs into the same run
        t.log_metrics({"valid_mlm": 4.2}, step=0)
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert _steps(client, run_id) == list(range(7))
    assert run.data.params == {"model.layers": "2"} and run.data.tags["stage"] == "pretrain"
    assert run.data.metrics["valid_mlm"] == 4.2 and run.info.status == "FINISHED"
    assert "table.csv" in [f.path for f in client.list_artifacts(run_id)]
    _assert_round_trip(server, run_id, model, example)
    assert not (tmp_path / "mlflow.db").exists()  # nothing written locally in server mode


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(MinibertError) as e:
        start_run(CFG, tmp_path)
    assert time.monotonic() - t0 < 10
    assert uri in str(e.value) and "\n" not in str(e.value)


class ThreadRecorder:
    """Wraps an MlflowClient and records which thread made each call."""

    def __init__(self, client):
        self._client, self.calls = client, []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append((name, threading.get_ident()))
            return attr(*args, **kwargs)
        return call


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _delivered(t, client, steps) -> bool:
    """The server holds `steps` and the tracker has had every answer: a point the server stored but whose
    reply a kill cut off stays queued (and counts as unsent), so seeing it on the server is not enough."""
    with t._cv:
        acked = t._pending() == 0
    return acked and _steps(client, t.run_id) == list(steps)


def test_server_killed_mid_run_buffers_then_flushes(mlflow_server, tmp_path, monkeypatch, caplog):
    uri = mlflow_server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    caplog.set_level(logging.WARNING, logger="minibert.tracking.tracker")
    t = start_run(CFG, tmp_path)
    t._client = rec = ThreadRecorder(t._client)
    t.log_params({"hidden": 13})
    _log_steps(t, range(5))
    _wait_for(lambda: _delivered(t, MlflowClient(uri), range(5)))
    stop_mlflow_server(mlflow_server.proc, signal.SIGKILL)

    _log_steps(t, range(5, 12))  # must neither raise nor stall training; the first failed send holds these
    _wait_for(lambda: any("not answering" in r.getMessage() for r in caplog.records))
    _log_steps(t, range(12, 15))  # known to be down now
    t.set_tags({"late": "tag"})
    down = [r for r in caplog.records if "not answering" in r.getMessage()]
    assert len(down) == 1 and uri in down[0].getMessage() and "\n" not in down[0].getMessage()
    assert t.last_step("loss") == 14  # buffered points count

    mlflow_server.restart()  # same port, same sqlite store
    t.close()
    client = MlflowClient(uri)
    hist = client.get_metric_history(t.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(15))
    assert {m.step: m.value for m in hist} == {s: 10.0 / (s + 1) for s in range(15)}
    run = client.get_run(t.run_id)
    assert run.data.tags["late"] == "tag" and run.info.status == "FINISHED"
    # Structural: the logging calls never reached the network on the training (caller's) thread;
    # only last_step reads the history there (once, before training).
    me = threading.get_ident()
    assert {name for name, tid in rec.calls if tid == me} <= {"get_metric_history"}
    assert {"log_batch", "set_terminated"} <= {name for name, tid in rec.calls if tid != me}


def test_close_gives_up_within_its_bound_when_the_server_stays_down(mlflow_server, tmp_path, monkeypatch,
                                                                    caplog):
    import minibert.tracking.tracker as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(tracking, "_CLOSE_WAIT_S", 2.0)
    caplog.set_level(logging.WARNING, logger="minibert.tracking.tracker")
    t = start_run(CFG, tmp_path)
    _log_steps(t, range(3))
    _wait_for(lambda: _delivered(t, MlflowClient(mlflow_server.uri), range(3)))
    stop_mlflow_server(mlflow_server.proc, signal.SIGKILL)
    try:
        _log_steps(t, range(3, 9))
        closer = threading.Thread(target=t.close)
        closer.start()
        closer.join(timeout=2.0 + 10.0)  # the bound, plus slack for a loaded machine
        assert not closer.is_alive(), "close() waited past its bound with the server down"
        lost = [r.getMessage() for r in caplog.records if "still unreachable" in r.getMessage()]
        assert len(lost) == 1 and "12 unsent items" in lost[0]  # 6 steps x 2 metrics
    finally:
        mlflow_server.restart()
    time.sleep(3 * tracking._RETRY_EVERY_S)  # an abandoned sender must not send late
    client = MlflowClient(mlflow_server.uri)
    assert _steps(client, t.run_id) == [0, 1, 2] and client.get_run(t.run_id).info.status == "RUNNING"


def test_import_is_cheap():
    code = "import sys, minibert.tracking.tracker; assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dvc_temp_experiments_log_into_the_repository_store(tmp_path, monkeypatch):
    from minibert.tracking.store import project_root, tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp_dir = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run" / "tmp1a2b"
    exp_dir.mkdir(parents=True)
    assert project_root(exp_dir) == (tmp_path / "repo").resolve()
    assert tracking_uri(exp_dir) == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"
    assert project_root(tmp_path) == tmp_path.resolve()


def test_log_model_without_example_writes_no_pickle(local, cfg, caplog):
    import mlflow
    import mlflow.pytorch

    with start_run(cfg, local) as t:
        t.log_model(Tiny())  # the only other PyTorch format MLflow has is a pickle: refused
        run_id = t.run_id
    assert "needs an input example" in caplog.text
    mlflow.set_tracking_uri(tracking_uri(local))
    # nothing was logged under `model`: loading finds no artifacts (not some other failure)
    with pytest.raises(mlflow.exceptions.MlflowException, match="Failed to download artifacts from path 'model'"):
        mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert "model" not in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}


def test_concurrent_first_runs_on_a_new_store_all_succeed(tmp_path, monkeypatch):
    """Three processes open tracked runs at the same instant (a barrier file) on a store that does not
    exist yet: all three finish and all three runs are in it. Without minibert.tracking.store.store_lock the
    three ran MLflow's schema migrations at once ("duplicate column name: step")."""
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(here / "race_tracked_run.py"), str(tmp_path), str(go),
                               str(tmp_path / f"ready-{i}"), str(i)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n---\n".join(o[-2000:] for o in outs)
    assert not any("cannot be opened" in o for o in outs), "\n---\n".join(outs)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["racer-0", "racer-1", "racer-2"]
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"x": float(r.info.run_name[-1])} for r in runs)


def test_artifact_copy_into_a_full_local_store_is_one_warning_and_keeps_the_old_copy(tmp_path, small_fs,
                                                                                     monkeypatch, caplog):
    """The local store's artifact folder on a 16 kB filesystem: a 100 kB file's copy fails with one
    warning, the copy of the same name logged before stays byte for byte, no temp is left, the run ends."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = small_fs("16k", "mlartifacts")  # where start_run puts a local store's artifacts
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1/a.bin").write_bytes(b"old")
    with start_run(TrackingConfig(experiment="full"), tmp_path) as t:
        t.log_artifact(tmp_path / "v1/a.bin")
        run_id = t.run_id
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2/a.bin").write_bytes(os.urandom(100_000))
    with caplog.at_level(logging.WARNING, logger="minibert.tracking"):
        with start_run(TrackingConfig(experiment="full"), tmp_path, run_id=run_id) as t:
            t.log_artifact(tmp_path / "v2/a.bin")
    said = [r.getMessage() for r in caplog.records if "not copied" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "No space left on device" in said[0], said
    assert "a.bin: No space left on device" in said[0] and "100.0 kB needed" in said[0]
    files = [p for p in store.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["a.bin"] and files[0].read_bytes() == b"old"
    assert MlflowClient(tracking_uri(tmp_path)).get_run(run_id).info.status == "FINISHED"


def test_a_store_that_cannot_be_opened_leaves_training_on_the_buffered_tracker(tmp_path, monkeypatch, caplog):
    """The store's lock held by another process past the wait: start_run says so in one warning and
    returns a tracker that queues; once the lock is free the run is created with everything logged."""
    import fcntl

    from minibert.tracking import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(store, "STORE_LOCK_WAIT_S", 0.3)
    holder = open(tmp_path / "mlflow.db.lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts with start_run's flock
    with caplog.at_level(logging.WARNING, logger="minibert.tracking"):
        tracker = start_run(TrackingConfig(experiment="busy"), tmp_path, run_name="late")
        assert tracker.run_id is None
        tracker.log_metrics({"loss": 2.5}, step=1)
        tracker.log_metrics({"loss": 1.5}, step=2)
        assert tracker.last_step("loss") == 2
        said = [r.getMessage() for r in caplog.records if "cannot be opened" in r.getMessage()]
        assert len(said) == 1 and "training goes on" in said[0] and "\n" not in said[0], said
        holder.close()  # the other process is done
        tracker.close()
    client = MlflowClient(tracking_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("busy").experiment_id])
    assert run.info.run_name == "late" and run.info.status == "FINISHED" and run.info.run_id == tracker.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.5), (2, 1.5)]
