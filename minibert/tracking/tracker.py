"""Experiment tracking: the only module that imports mlflow.

`runs.start_run(cfg, root)` gives a `Tracker`: an `MlflowTracker` on a real run, or a `NullTracker`
when tracking is off. Tracking must never stop training: an unreachable server fails fast at
the start (one line naming the URI), but once a run is open, failed metric points are kept in
memory (bounded) and sent by a background thread, with their original steps and timestamps,
when the server answers again; `close()` waits for them at most `_CLOSE_WAIT_S`.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from minibert.artifacts import atomic_path
from minibert.errors import WriteError
from minibert.tracking.store import fluent_uris, is_http, mlflow_module, one_line, reachable, store_client

log = logging.getLogger(__name__)

_MAX_BUFFERED = 100_000  # metric points kept while the server is down (~10 MB); oldest dropped first
_SEND_EVERY_S = 1.0  # the sender batches what arrived in this interval into one request
_RETRY_EVERY_S = 2.0  # while the backend fails, the sender retries this often
_CLOSE_WAIT_S = 30.0  # close() waits at most this long for the last points to go out
# MLflow error codes that retrying cannot fix (bad values, missing runs): drop, warn, go on.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
              "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}


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
        self._Metric = mlflow_module().entities.Metric
        self._cv = threading.Condition()  # guards every queue and flag below; wakes the sender
        self._metrics: deque = deque()  # mlflow Metric entities not yet sent (bounded in log_metrics)
        self._in_flight = 0  # metric points sent but not yet answered: still pending until the reply
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
        mlflow = mlflow_module()
        import mlflow.pytorch  # noqa: F811 - the submodule, loaded on first use
        import torch

        reqs = pip_requirements or [f"torch=={torch.__version__.split('+')[0]}"]
        was_training = model.training
        model.eval()  # export and signature must see inference behaviour (no dropout)
        try:
            kwargs = dict(signature=_encoder_signature(model, example), input_example=tuple(example.values()),
                          serialization_format="pt2")
            with self.fluent_run():
                mlflow.pytorch.log_model(model, name="model", pip_requirements=reqs, **kwargs)
        except Exception as e:  # the model file is in DVC anyway: losing the copy must not fail the stage
            log.warning("MLflow: could not log the model to run %s at %s: %s", self.run_id, self.uri,
                        one_line(e)[:300])
        finally:
            model.train(was_training)

    @contextmanager
    def fluent_run(self):
        """This run as MLflow's fluent active run, for calls that only log into that (log_model).

        Leaving `mlflow.start_run`'s context marks the run finished: its status is put back to RUNNING."""
        mlflow = mlflow_module()
        with fluent_uris(self.uri), mlflow.start_run(run_id=self.run_id):
            yield mlflow
        self._client.update_run(self.run_id, status="RUNNING")

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
            log.warning("MLflow: could not read metric %r of run %s: %s", key, self.run_id, one_line(e))
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
        """Items still to send, the chunk in flight included (call with the lock held)."""
        return len(self._metrics) + self._in_flight + len(self._params) + len(self._tags) + len(self._artifacts)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending() or self._status or self._abandoned)
                if self._abandoned:
                    return
                ending = self._status is not None
            try:
                if self._down_since is not None and is_http(self.uri) and reachable(self.uri, 1.0) is not None:
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
                why = (reachable(self.uri, timeout=1.0) if is_http(self.uri) else None) or one_line(e)[:200]
                log.warning("MLflow at %s is not answering (%s); buffering metrics in memory "
                            "and retrying, training goes on", self.uri, why)
                self._warned_down = True

    def _send(self) -> None:
        """log_batch in MLflow's size limits; each chunk leaves the queue once stored (or rejected)."""
        entities = mlflow_module().entities
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
                self._in_flight = len(chunk)
            if not chunk:
                break
            try:
                self._attempt(lambda: self._client.log_batch(self.run_id, metrics=chunk, synchronous=True))
            except Exception:
                with self._cv:
                    self._metrics.extendleft(reversed(chunk))
                    self._in_flight = 0
                raise
            with self._cv:
                self._in_flight = 0
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
            log.warning("MLflow rejected data for run %s: %s", self.run_id, one_line(e)[:300])


def _encoder_signature(model, example: dict[str, Any]):
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
