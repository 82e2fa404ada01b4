"""Experiment tracking: the only module that imports mlflow.

`start_run(cfg, root)` gives a `Tracker`: an `MlflowTracker` on a real run, or a `NullTracker`
when tracking is off. Tracking must never stop training: an unreachable server fails fast at
the start (one line naming the URI), but once a run is open, failed metric points are kept in
memory (bounded) and sent by a background thread, with their original steps and timestamps,
when the server answers again; `close()` waits for them at most `_CLOSE_WAIT_S`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from minibert import view
from minibert.artifacts import atomic_path
from minibert.config import TrackingConfig
from minibert.describe import describe_run, hyperparams
from minibert.errors import MinibertError, WriteError

log = logging.getLogger(__name__)

_MAX_BUFFERED = 100_000  # metric points kept while the server is down (~10 MB); oldest dropped first
_SEND_EVERY_S = 1.0  # the sender batches what arrived in this interval into one request
_RETRY_EVERY_S = 2.0  # while the backend fails, the sender retries this often
_CLOSE_WAIT_S = 30.0  # close() waits at most this long for the last points to go out
_PROBE_TIMEOUT_S = 3.0
_STORE_LOCK_WAIT_S = 120.0  # creating and migrating a new sqlite store takes seconds; then give up waiting
# MLflow error codes that retrying cannot fix (bad values, missing runs): drop, warn, go on.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
              "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def _mlflow():
    """Import mlflow on first use, with telemetry off and HTTP retries short.

    MLflow's client retries a dead server for minutes by default; our own buffering is the
    retry, so one quick retry per call is enough. `setdefault` lets a user override both.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


@contextmanager
def fluent_uris(uri: str):
    """MLflow's fluent API (log_model, register_model) pointed at `uri` for one call, then put back.

    `mlflow.set_tracking_uri`/`set_registry_uri` also write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    os.environ for subprocesses; left there, a later run of this process (`tracking_uri` reads the
    variable first) or a subprocess it starts would talk to this run's store."""
    mlflow = _mlflow()
    from mlflow.tracking import _model_registry, _tracking_service

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def project_root(path: Path) -> Path:
    """The repository a run's local store belongs to. DVC runs `exp run --temp` and queued
    experiments in `<repo>/.dvc/tmp/exps/...`: their runs belong in `<repo>/mlflow.db`, not in a
    folder that is deleted when the experiment ends."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(path).resolve()


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else an sqlite file at the project root (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root)}/mlflow.db"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _reachable(uri: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None when an HTTP server answers at `uri` (any status), else the reason it does not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: auth or routing problems surface from MLflow itself
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None if isinstance(reason, ssl.SSLError) else str(reason)  # TLS answered: MLflow decides


def git_tags(root: Path) -> dict[str, str]:
    """The commit and whether tracked files differ from it; the DVC experiment name when set."""
    tags: dict[str, str] = {}
    try:
        git = ["git", "-C", str(root)]
        sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["mlflow.source.git.commit"] = sha.stdout.strip()
            st = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
            tags["git_dirty"] = str(bool(st.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git: the run is still worth recording
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: Any, example: dict[str, Any] | None = None,
                  pip_requirements: list[str] | None = None) -> None: ...
    def last_step(self, key: str) -> int | None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class _ContextMixin:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status)


class NullTracker(_ContextMixin):
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_model(self, model, example=None, pip_requirements=None): pass
    def last_step(self, key): return None
    def close(self, status="FINISHED"): pass


class MlflowTracker(_ContextMixin):
    """One MLflow run; logging calls never raise and never touch the network once the run is open.

    log_params/set_tags/log_metrics/log_artifact only append to in-memory queues (metrics bounded:
    `_MAX_BUFFERED` points, oldest dropped first) and return; one daemon thread, the sender, drains
    them with `log_batch` at most every `_SEND_EVERY_S`. When the backend fails, the sender keeps
    everything and retries every `_RETRY_EVERY_S` (a cheap /health probe first on a server), so an
    outage costs training nothing and loses nothing once the server is back. `close()` hands the
    final flush and the run's end status to the sender and waits at most `_CLOSE_WAIT_S` for it.

    Why our own thread and not MLflow's `synchronous=False` logging: MLflow's async queue drops a
    batch whose request fails (no retry across an outage) and its flush waits without a bound.
    """

    def __init__(self, uri: str, run_id: str | None, opener=None):
        """`opener(client) -> run_id`, with `run_id` None: the store could not be opened yet; the
        sender opens it (and the run) on its first successful attempt, meanwhile everything queues."""
        self.uri, self.run_id, self._opener = uri, run_id, opener
        self._client = None if opener else store_client(uri)
        self._Metric = _mlflow().entities.Metric
        self._cv = threading.Condition()  # guards every queue and flag below; wakes the sender
        self._metrics: deque = deque()  # mlflow Metric entities not yet sent (bounded in log_metrics)
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._status: str | None = None  # set by close(): the sender ends the run after the last flush
        self._abandoned = False  # close() stopped waiting: the sender gives up
        self._down_since: float | None = None  # set while the backend is failing
        self._warned_down = self._warned_full = False
        self._closed = False
        self._artifact_root: str | None = None  # the run's artifact URI, read on the first copy
        self._sender = threading.Thread(target=self._send_loop, name="minibert-mlflow-sender", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ public API

    def log_params(self, params: dict[str, Any]) -> None:
        with self._cv:
            self._params.update({k: str(v) for k, v in params.items()})
            self._cv.notify()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._cv:
            self._tags.update({k: str(v) for k, v in tags.items()})
            self._cv.notify()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)  # stamped now so a late send keeps the real time
        points = [self._Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with self._cv:
            self._metrics.extend(points)
            if len(self._metrics) > _MAX_BUFFERED:
                if not self._warned_full:
                    log.warning("MLflow buffer full (%d points): dropping the oldest unsent metrics", _MAX_BUFFERED)
                    self._warned_full = True
                while len(self._metrics) > _MAX_BUFFERED:
                    self._metrics.popleft()
            self._cv.notify()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            log.warning("MLflow: artifact %s does not exist; not logged to run %s", path, self.run_id)
            return
        with self._cv:
            self._artifacts.append((str(path), artifact_path))
            self._cv.notify()

    def log_model(self, model, example: dict[str, Any] | None = None,
                  pip_requirements: list[str] | None = None) -> None:
        """Log `model` as the run's `model`, with a signature from `example` and no requirement inference.

        Saved as a `torch.export` graph (pt2: loads without unpickling; `example`'s keys in the order
        of `forward`'s arguments). Without an example nothing is logged: the other format MLflow has
        for PyTorch is a pickle, which this project never writes or loads. Runs on the caller's thread
        (MLflow's fluent API), once, after training.
        """
        if self.run_id is None:
            log.warning("MLflow store %s not open yet: model not logged", self.uri)
            return
        if example is None:
            log.warning("MLflow: log_model needs an input example (torch.export); model not logged to run %s",
                        self.run_id)
            return
        mlflow = _mlflow()
        import mlflow.pytorch  # noqa: F811 - the submodule, loaded on first use
        import torch

        reqs = pip_requirements or [f"torch=={torch.__version__.split('+')[0]}"]
        was_training = model.training
        model.eval()  # export and signature must see inference behaviour (no dropout)
        try:
            kwargs = dict(signature=_signature(model, example), input_example=tuple(example.values()),
                          serialization_format="pt2")
            # log_model only logs into the fluent active run: resume ours for the call, then
            # put its status back (leaving the context marks it finished).
            with fluent_uris(self.uri), mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, name="model", pip_requirements=reqs, **kwargs)
            self._client.update_run(self.run_id, status="RUNNING")
        except Exception as e:  # the model file is in DVC anyway: losing the copy must not fail the stage
            log.warning("MLflow: could not log the model to run %s at %s: %s", self.run_id, self.uri,
                        _one_line(e)[:300])
        finally:
            model.train(was_training)

    def last_step(self, key: str) -> int | None:
        """Largest step already logged (or queued) for `key`; None when there is none."""
        with self._cv:
            steps = [m.step for m in self._metrics if m.key == key]
            down = self._down_since is not None
        if (steps and down) or self.run_id is None:
            return max(steps, default=None)  # queued points are newer than anything stored
        try:
            steps += [m.step for m in self._client.get_metric_history(self.run_id, key)]
        except Exception as e:
            log.warning("MLflow: could not read metric %r of run %s: %s", key, self.run_id, _one_line(e))
        return max(steps, default=None)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued and end the run, waiting at most `_CLOSE_WAIT_S`; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with self._cv:
            self._status = status
            self._cv.notify()
        self._sender.join(timeout=_CLOSE_WAIT_S)
        if self._sender.is_alive():  # still failing: give up rather than hold the stage's end
            with self._cv:
                self._abandoned = True
                lost = self._pending()
                self._cv.notify()
            log.warning("MLflow at %s still unreachable after %.0f s: %d unsent items of run %s are lost "
                        "and the run stays RUNNING", self.uri, _CLOSE_WAIT_S, lost, self.run_id)

    # ------------------------------------------------------------------ the sender thread

    def _pending(self) -> int:
        """Items still to send (call with the lock held)."""
        return len(self._metrics) + len(self._params) + len(self._tags) + len(self._artifacts)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending() or self._status or self._abandoned)
                if self._abandoned:
                    return
                ending = self._status is not None
            try:
                if self._down_since is not None and _is_http(self.uri) and _reachable(self.uri, 1.0) is not None:
                    raise ConnectionError("no answer on /health")
                self._send()
                if ending:
                    with self._cv:
                        done = not self._pending()
                    if done:
                        self._attempt(lambda: self._client.set_terminated(self.run_id, self._status))
                        return
            except Exception as e:
                self._went_down(e)
                with self._cv:
                    self._cv.wait_for(lambda: self._abandoned, timeout=_RETRY_EVERY_S)
                continue
            if self._down_since is not None:
                log.warning("MLflow at %s is back after %.0f s; buffered metrics sent", self.uri,
                            time.monotonic() - self._down_since)
                self._down_since = None
            with self._cv:  # let points gather: one request per interval, not one per step
                self._cv.wait_for(lambda: self._status is not None or self._abandoned, timeout=_SEND_EVERY_S)

    def _went_down(self, e: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            if not self._warned_down:
                why = (_reachable(self.uri, timeout=1.0) if _is_http(self.uri) else None) or _one_line(e)[:200]
                log.warning("MLflow at %s is not answering (%s); buffering metrics in memory "
                            "and retrying, training goes on", self.uri, why)
                self._warned_down = True

    def _send(self) -> None:
        """log_batch in MLflow's size limits; each chunk leaves the queue once stored (or rejected)."""
        entities = _mlflow().entities
        if self.run_id is None:  # the store could not be opened at the start: open it (and the run) now
            self._client = self._client or store_client(self.uri)
            self.run_id = self._opener(self._client)
            log.warning("MLflow store %s is open now: run %s created, buffered data follows", self.uri, self.run_id)
        while True:
            with self._cv:
                params, tags = list(self._params.items())[:100], list(self._tags.items())[:100]
            if not (params or tags):
                break
            self._attempt(lambda: self._client.log_batch(
                self.run_id, params=[entities.Param(k, v) for k, v in params],
                tags=[entities.RunTag(k, v) for k, v in tags], synchronous=True))
            with self._cv:  # a value set again meanwhile stays queued
                for k, v in params:
                    if self._params.get(k) == v:
                        del self._params[k]
                for k, v in tags:
                    if self._tags.get(k) == v:
                        del self._tags[k]
        while True:
            with self._cv:  # the chunk leaves the queue while in flight; put back in front if it fails
                chunk = [self._metrics.popleft() for _ in range(min(1000, len(self._metrics)))]
            if not chunk:
                break
            try:
                self._attempt(lambda: self._client.log_batch(self.run_id, metrics=chunk, synchronous=True))
            except Exception:
                with self._cv:
                    self._metrics.extendleft(reversed(chunk))
                raise
        while True:
            with self._cv:
                if not self._artifacts:
                    break
                path, dest = self._artifacts[0]
            try:
                self._attempt(lambda: self._copy_artifact(path, dest))
            except WriteError as e:  # a full artifact store: retrying will not help; the file is in DVC
                log.warning("MLflow: %s not copied into run %s: %s", path, self.run_id, e)
            with self._cv:
                self._artifacts.pop(0)

    def _copy_artifact(self, path: str, dest: str | None) -> None:
        """MLflow's copy, except a file into a local store: temp then rename (MLflow copies in place,
        so a full disk would leave a torn file over the previous one); no room raises WriteError."""
        if Path(path).is_dir():
            return self._client.log_artifacts(self.run_id, path, dest)
        if self._artifact_root is None:
            self._artifact_root = self._client.get_run(self.run_id).info.artifact_uri
        from urllib.parse import unquote, urlparse

        root = self._artifact_root
        if urlparse(root).scheme not in ("", "file"):  # a server's mlflow-artifacts:/, s3://, ...
            return self._client.log_artifact(self.run_id, path, dest)
        folder = Path(unquote(urlparse(root).path) if root.startswith("file:") else root) / (dest or "")
        target = folder / Path(path).name
        with atomic_path(target, Path(path).stat().st_size) as tmp:
            shutil.copyfile(path, tmp)

    def _attempt(self, call) -> None:
        """Run one MLflow call; a rejection retrying cannot fix is warned about and skipped."""
        try:
            call()
        except Exception as e:
            if getattr(e, "error_code", None) not in _PERMANENT:
                raise  # connection trouble: the caller keeps the data queued
            log.warning("MLflow rejected data for run %s: %s", self.run_id, _one_line(e)[:300])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _signature(model, example: dict[str, Any]):
    """Inputs from `example`, outputs from running the model on it (caller set eval mode)."""
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(*(torch.as_tensor(v) for v in example.values()))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    arrays = {f"output_{i}": o.cpu().numpy() for i, o in enumerate(outs) if isinstance(o, torch.Tensor)}
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    sig = infer_signature({k: np.asarray(v) for k, v in example.items()}, arrays)
    # Every dimension is variable (batch size, sequence length): -1 makes MLflow export them as
    # dynamic, so the loaded model takes any shape, not just the example's.
    def dynamic(schema):
        return Schema([TensorSpec(t.type, (-1,) * len(t.shape), t.name) for t in schema.inputs])
    return ModelSignature(inputs=dynamic(sig.inputs), outputs=dynamic(sig.outputs))


@contextmanager
def store_lock(uri: str):
    """An exclusive flock on `<db>.lock` beside an sqlite store, held while a client opens it: opening
    creates or upgrades the schema (MLflow's migrations), which two processes on a new file would run
    at once ("duplicate column name"). Every minibert process takes it; other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as f:
        deadline = time.monotonic() + _STORE_LOCK_WAIT_S
        while True:  # bounded: a hung process holding the lock must not hang every training
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(f"{lock} held by another process for {_STORE_LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.05)
        yield


class StoreBusy(Exception):
    """Another process held the store's lock past `_STORE_LOCK_WAIT_S`."""


def store_client(uri: str, registry: bool = False):
    """An MlflowClient for `uri` (and its registry), the store created or upgraded under `store_lock`."""
    with store_lock(uri):
        return _mlflow().MlflowClient(uri, registry_uri=uri if registry else None)


def _connect(uri: str):
    """A client for `uri`, failing in seconds with one line when the server is not there."""
    if _is_http(uri) and (why := _reachable(uri)) is not None:
        raise MinibertError(f"MLflow server {uri} is unreachable ({why}); start it, fix "
                            "MLFLOW_TRACKING_URI, or set tracking.enabled: false in params.yaml")
    return store_client(uri)


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
    client = _connect(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise MinibertError(f"no experiment {cfg.experiment!r} at {uri}; run the pipeline first (dvc repro)")
    _set_view_tags(client, exp)
    return view.runs_url(base, exp.experiment_id, chart=chart)


def start_run(cfg: TrackingConfig, root: Path, run_id: str | None = None, run_name: str | None = None,
              params: dict[str, Any] | None = None, params_file: Path | None = None) -> Tracker:
    """Open a run: resume `run_id` when given, else a new run in `cfg.experiment` tagged with git
    state. A new run with `params` (the flattened config) logs its hyperparameters and is named and
    described from them and `params_file` (minibert/describe.py)."""
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
        tags = git_tags(root)
        name = run_name
        if params is not None:
            described_name, described = describe_run(params, params_file, root)
            name, tags = run_name or described_name, {**tags, **described}
        return client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    try:
        tracker = MlflowTracker(uri, open_run(_connect(uri)))
    except MinibertError:
        raise
    except Exception as e:
        if not _store_trouble(e):
            what = f"run {run_id}" if run_id else f"a run in experiment {cfg.experiment!r}"
            raise MinibertError(f"MLflow at {uri}: could not open {what}: {_one_line(e)[:300]}") from None
        # A store that cannot be opened now (locked, damaged, being migrated) must not cost the training.
        log.warning("MLflow store %s cannot be opened (%s); training goes on, its tracking data buffered "
                    "in memory and sent once the store opens", uri, _one_line(e)[:200])
        tracker = MlflowTracker(uri, None, opener=open_run)
    if params is not None and run_id is None:  # a new run logs its hyperparameters
        tracker.log_params(hyperparams(params))
    return tracker


def _store_trouble(e: BaseException) -> bool:
    """The database under the store failed (sqlite locked, schema migrations colliding, a bad file),
    not a request MLflow refused."""
    if isinstance(e, StoreBusy):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    db = {"OperationalError", "DatabaseError", "IntegrityError", "ProgrammingError"}
    return bool(names & db) or any(f"{n}:" in str(e) or f"{n})" in str(e) for n in db)  # MLflow may wrap it


def list_runs(cfg: TrackingConfig, root: Path, max_results: int = 100):
    """Runs of `cfg.experiment`, newest first: ids, status, times, then metrics./params./tags. columns."""
    import pandas as pd

    uri = tracking_uri(root)
    client = _connect(uri)
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
    client = _connect(uri)
    try:
        return Path(client.download_artifacts(run_id, artifact_path, str(dest)))
    except Exception as e:
        raise MinibertError(f"MLflow at {uri}: could not fetch {artifact_path!r} of run {run_id} "
                            f"({_one_line(e)[:200]}); check the id with `minibert runs`") from None


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


# The text-in pyfunc, the Model Registry and the `champion` alias live in tracking_models.py (this
# file was already over 400 lines); re-exported here lazily, so importing tracking stays cheap and
# `minibert.tracking` remains the one door to MLflow.
_MODEL_API = ("log_text_model", "register_version", "set_champion", "download_model", "run_metrics", "CHAMPION")


def __getattr__(name: str):
    if name in _MODEL_API:
        from minibert import tracking_models

        return getattr(tracking_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
