"""The served text model: an MLflow pyfunc that takes text and returns encodings or fill-mask words.

The pyfunc is a model from code, not a pickle: MLflow stores `pyfunc_model.py` (which calls
`set_text_model()`), the minibert package as `code_paths`, and the weights, their metadata and the
vocabulary as plain artifacts (safetensors, JSON, text). It takes a DataFrame with a `text` column
(optional `pair`) and returns per row the tokens, segments and encodings (mode `encode`), or the
top-k words for each `<mask>` (mode `fill-mask`). Bad rows raise INVALID_PARAMETER_VALUE: HTTP 400.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from minibert.errors import MinibertError
from minibert.tracking.store import mlflow_module, one_line

log = logging.getLogger(__name__)

ENTRY_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "text_model"  # the logged model's name in its run
MODES = ("encode", "fill-mask")
PACKAGE = Path(__file__).resolve().parents[1]  # minibert/: the code the served model runs with


def _bad(message: str):
    return mlflow_module().exceptions.MlflowException.invalid_parameter_value(message)


def _rows(model_input) -> list[tuple[str, str | None]]:
    """(text, pair) per row, or INVALID_PARAMETER_VALUE naming the first bad row."""
    import pandas as pd

    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "text" not in df.columns:
        raise _bad(f"input needs a 'text' column (got {list(df.columns)}); send {{\"inputs\": [{{\"text\": \"a crane is flying\"}}]}}")
    pairs = df["pair"] if "pair" in df.columns else [None] * len(df)
    rows = []
    for i, (a, b) in enumerate(zip(df["text"], pairs)):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            b = None
        for col, s in (("text", a), ("pair", b)):
            if col == "pair" and s is None:
                continue
            if not isinstance(s, str):
                raise _bad(f"row {i}: {col} must be a string, got {type(s).__name__} {s!r}")
            if not s.split():
                raise _bad(f"row {i}: {col} is empty; pass at least one word")
        rows.append((a, b))
    if not rows:
        raise _bad("no rows in the input")
    return rows


def make_text_model():
    """The pyfunc instance; its class is built here so importing this module does not import mlflow."""
    class MinibertText(mlflow_module().pyfunc.PythonModel):
        """Text in; tokens with encodings, or top-k words for each `<mask>`, out."""

        def load_context(self, context):
            from minibert.data.vocab import Vocab
            from minibert.model.bert import load_pretrained

            folder = Path(context.artifacts["model"])
            self.model, _ = load_pretrained(folder)
            self.vocab = Vocab.load(folder / "vocab.txt")

        def predict(self, context, model_input, params=None):
            import pandas as pd

            params = params or {}
            mode, top_k = params.get("mode", "encode"), int(params.get("top_k", 5))
            if mode not in MODES:
                raise _bad(f"params.mode = {mode!r}; use one of {', '.join(MODES)}")
            if not 1 <= top_k <= len(self.vocab):
                raise _bad(f"params.top_k = {top_k}; use an integer in [1, {len(self.vocab)}]")
            batch = encode_rows(self.model, self.vocab, _rows(model_input), mode, top_k)
            return pd.DataFrame(batch)

    return MinibertText()


def encode_rows(model, vocab, rows, mode: str, top_k: int) -> list[dict]:
    """One padded forward for all rows: per row tokens + segments + encoding (T, H), or masks' top-k."""
    import torch

    from minibert.data.vocab import MASK, pair_layout

    ids, segs = [], []
    for i, (a, b) in enumerate(rows):
        words, segments = pair_layout(a.lower().split(), b.lower().split() if b else None, "<cls>", "<sep>")
        if len(words) > model.cfg.max_len:
            raise _bad(f"row {i}: {len(words)} tokens (with <cls>/<sep>) exceed max_len {model.cfg.max_len}; "
                       "shorten the text")
        ids.append(vocab.encode(words))
        segs.append(segments)
    lens = [len(x) for x in ids]
    T = max(lens)
    dev = next(model.parameters()).device  # the inputs go where the model is
    tokens = torch.tensor([x + [0] * (T - len(x)) for x in ids], device=dev)  # (B, T)
    segments = torch.tensor([s + [0] * (T - len(s)) for s in segs], device=dev)  # (B, T)
    valid = torch.tensor(lens, device=dev)  # (B,)
    out = [{"tokens": vocab.decode(x), "segments": s} for x, s in zip(ids, segs)]
    with torch.inference_mode():
        if mode == "encode":
            enc = model.encode(tokens, segments, valid).float().cpu().numpy()  # (B, T, H)
            for b, (r, n) in enumerate(zip(out, lens)):
                r["encoding"] = enc[b, :n].tolist()  # (T_b, H)
            return out
        where = [[t for t, w in enumerate(x) if w == MASK] for x in ids]
        for i, w in enumerate(where):
            if not w:
                raise _bad(f"row {i}: no <mask> in the text; fill-mask needs at least one")
        P = max(len(w) for w in where)
        pos = torch.tensor([w + [0] * (P - len(w)) for w in where], device=dev)  # (B, P)
        weights = torch.tensor([[1.0] * len(w) + [0.0] * (P - len(w)) for w in where], device=dev)  # (B, P)
        logits, _ = model(tokens, segments, valid, pos, weights)  # (M, V), masks row-major
        probs, top = torch.topk(torch.softmax(logits.double(), -1), top_k)  # (M, k)
        probs, top = probs.cpu(), top.cpu()
        m = 0
        for r, w in zip(out, where):
            r["masks"] = []
            for p in w:
                r["masks"].append({"position": p, "words": vocab.decode(top[m].tolist()),
                                   "scores": probs[m].tolist()})
                m += 1
    return out


def set_text_model() -> None:
    """Called by pyfunc_model.py when MLflow loads the model from code."""
    mlflow_module().models.set_model(make_text_model())


# ---------------------------------------------------------------------------- logging into a run


def _text_signature():
    mlflow = mlflow_module()
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    # `Any`, not `string`: MLflow would turn {"text": 5} into "5" before predict sees it; the rows
    # are checked in predict instead, so a non-string gets a 400 naming the row.
    inputs = Schema([ColSpec(AnyType(), "text"), ColSpec(AnyType(), "pair", required=False)])
    params = ParamSchema([ParamSpec("mode", "string", "encode"), ParamSpec("top_k", "long", 5)])
    return mlflow.models.ModelSignature(inputs=inputs, params=params)


def log_text_model(tracker, model_dir: Path, vocab_path: Path) -> str | None:
    """Log the text pyfunc into the tracker's run; its model URI, or None (tracking off or it failed)."""
    if getattr(tracker, "uri", None) is None or tracker.run_id is None:
        return None
    mlflow = mlflow_module()
    import mlflow.pyfunc  # noqa: F811 - the submodule
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "safetensors", "pyyaml"]
    try:
        with tempfile.TemporaryDirectory(prefix="minibert-pyfunc-") as tmp:
            staged = Path(tmp) / "model"
            staged.mkdir()
            for f in (Path(model_dir) / "bert.safetensors", Path(model_dir) / "bert.json", Path(vocab_path)):
                shutil.copyfile(f, staged / f.name)
            code = Path(tmp) / "minibert"  # the package the model runs with, without bytecode caches
            shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            with tracker.fluent_run():
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=str(ENTRY_FILE), artifacts={"model": str(staged)},
                    code_paths=[str(code)], signature=_text_signature(), pip_requirements=reqs)
        return info.model_uri
    except Exception as e:  # the weights are in DVC and the run's artifacts: this copy must not fail the stage
        log.warning("MLflow: could not log the text model to run %s: %s", tracker.run_id, one_line(e)[:300])
        return None


def _listener_pid(port: int) -> int | None:
    """The pid of a process listening on TCP `port` (Linux /proc, this user's processes), or None."""
    import os

    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
            except OSError:
                continue
    return None


def port_in_use(host: str, port: int) -> str:
    pid = _listener_pid(port)
    owner = f" (pid {pid}?)" if pid else ""
    return f"port {port} on {host} is in use{owner}; pick another with --port"


def check_address(host: str, port: int) -> None:
    """Bind `host`:`port` for a moment, as the server will (SO_REUSEADDR, like uvicorn): one line saying
    why it cannot listen there (port taken, host not this machine's, privileged port), or nothing."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise MinibertError(f"port {port} is not a TCP port; pick one in 1..65535 with --port")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise MinibertError(f"host {host!r} does not resolve ({e.strerror}); use --host 127.0.0.1 (this "
                            "machine only) or --host 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MinibertError(port_in_use(host, port)) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise MinibertError(f"host {host} is not an address of this machine; use --host 127.0.0.1 "
                                    "(this machine only) or --host 0.0.0.0 (every interface)") from None
            if e.errno == errno.EACCES:
                raise MinibertError(f"port {port} on {host} needs privileges this user lacks; pick one "
                                    "above 1023 with --port") from None
            raise MinibertError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host "
                                "or --port") from None


def _reason(log_text: str) -> str:
    """The line of a failed server's output that says why: its last ERROR line, else the exception's."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("ERROR:"):
            return " ".join(ln.removeprefix("ERROR:").split())
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ": " in ln and not ln.startswith("File ") and (head.endswith(("Error", "Exception")) or "." in head
                                                          and head.split(".")[-1][:1].isupper()):
            return " ".join(ln.split())
    return " ".join(lines[-1].split()) if lines else "no output"


def _up(host: str, port: int) -> bool:
    import urllib.error
    import urllib.request

    where = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    try:
        with urllib.request.urlopen(f"http://{where}:{port}/ping", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def serve(model_uri: str, host: str, port: int, workers: int, root: Path) -> int:
    """`mlflow models serve` for a registered text model, in this environment; its exit code.

    The address is checked (a bind test) and the model's version looked up before MLflow starts, so a
    taken port, a foreign host or a missing model is one line. MLflow starts the server with `uvicorn`
    looked up on PATH, so a virtual environment that is not activated fails with "returned non zero
    return code 127": the interpreter's own bin folder goes first on PATH, and the tracking store is the
    project's (not whatever cwd MLflow would pick). The server's output goes to a log file, and to the
    terminal once it answers (its request log); a server that exits with an error is one line (what it
    said, where the whole log is), not MLflow's traceback."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from minibert.tracking.registry import registered_version
    from minibert.tracking.store import tracking_uri

    check_address(host, port)
    try:
        version = registered_version(model_uri, root)
    except MinibertError:
        raise
    except Exception as e:  # e.g. sqlite "file is not a database": MLflow's traceback, as one line
        raise MinibertError(f"MLflow store {tracking_uri(root)} could not be opened ({one_line(e).split(' [SQL:')[0][:200]}); "
                            "point MLFLOW_TRACKING_URI at a working store, or move this file away and rerun "
                            "the pipeline (dvc repro)") from None
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", host, "-p", str(port), "-w", str(workers)]
    fd, log_name = tempfile.mkstemp(prefix=f"minibert-serve-{port}-", suffix=".log")
    print(f"minibert serve: {model_uri} (version {version}) at http://{host}:{port}/invocations "
          f"(POST JSON, e.g. {{\"inputs\": {{\"text\": [\"a crane is flying\"]}}}}); Ctrl-C stops "
          f"(log: {log_name})", flush=True)
    up, echo = threading.Event(), [True]

    def pump(stream, log):
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            if raw.startswith(b"Traceback"):
                echo[0] = False  # a failure: summed up in one line below, whole in the log
            if up.is_set() and echo[0]:
                sys.stderr.write(raw.decode(errors="replace"))
                sys.stderr.flush()

    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        def stop(signum, frame):
            raise KeyboardInterrupt  # SIGTERM (a service manager, `timeout`): stop the server with us

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop)
        try:
            while proc.poll() is None:
                if not up.is_set() and _up(host, port):
                    up.set()
                    print(f"minibert serve: up at http://{host}:{port}", flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            reader.join(timeout=5)
            return 130
        reader.join(timeout=5)
    code = proc.returncode
    if code in (0, -2, -15):  # stopped (SIGINT/SIGTERM): not a failure
        return 0 if code == 0 else 128 - code
    said = Path(log_name).read_text(errors="replace")
    if "address already in use" in said:
        raise MinibertError(port_in_use(host, port))
    raise MinibertError(f"the MLflow server for {model_uri} exited with code {code}: {_reason(said)[:300]}; "
                        f"whole output in {log_name}")
