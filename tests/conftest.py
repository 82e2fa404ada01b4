"""Shared fixtures: real WikiText-2 (via MINIBERT_DATA, else skipped), the real downstream data (via
MINIBERT_TASK_DATA, else skipped) and a loopback HTTP server."""
from __future__ import annotations

import os
import threading
import time
import zipfile
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

WIKI_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def _real_data() -> Path:
    src = os.environ.get("MINIBERT_DATA")
    if not src:
        pytest.skip("MINIBERT_DATA unset: set it to wikitext-2-v1.zip or its folder to run real-data tests")
    return Path(src)


def _task_data() -> Path:
    src = os.environ.get("MINIBERT_TASK_DATA")
    if not src:
        pytest.skip("MINIBERT_TASK_DATA unset: set it to ../shared/data/downstream to run the downstream-data tests")
    return Path(src)


@pytest.fixture(scope="session")
def task_data() -> Path:
    """The folder of real labelled data and word-similarity judgements (BBC News, Pang & Lee, SimLex-999…)."""
    return _task_data()


@pytest.fixture(scope="session")
def wikitext_folder(tmp_path_factory) -> Path:
    """A folder holding the three real `.tokens` files (read-only use, please)."""
    src = _real_data()
    if src.is_dir():
        return src
    out = tmp_path_factory.mktemp("wikitext-2")
    with zipfile.ZipFile(src) as zf:
        for info in zf.infolist():
            if Path(info.filename).name in WIKI_FILES:
                (out / Path(info.filename).name).write_bytes(zf.read(info))
    return out


@pytest.fixture(scope="session")
def wikitext_zip(wikitext_folder, tmp_path_factory) -> Path:
    """The real archive (official layout: `wikitext-2/wiki.*.tokens`)."""
    src = _real_data()
    if src.is_file():
        return src
    out = tmp_path_factory.mktemp("zip") / "wikitext-2-v1.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in WIKI_FILES:
            zf.write(wikitext_folder / name, f"wikitext-2/{name}")
    return out


@pytest.fixture(scope="session")
def hf_parquet_dir(wikitext_folder, tmp_path_factory) -> Path:
    """The Hugging Face layout: one parquet per split, one `text` row per line, blank lines as ""."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("parquet")
    for split, hf_name in (("train", "train"), ("valid", "validation"), ("test", "test")):
        lines = (wikitext_folder / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
        rows = ["" if not line.strip() else line for line in lines]
        pq.write_table(pa.table({"text": rows}), out / f"{hf_name}-00000-of-00001.parquet")
    return out


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; `server.plan[path]` lists faults to inject first: 500, stall, truncate, 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits[self.path] += 1
        plan = self.server.plan.get(self.path)
        fault = plan.pop(0) if plan else None
        if fault in ("500", "404"):
            self.send_error(int(fault))
        elif fault == "stall":
            time.sleep(self.server.stall_s)
            self.send_error(503)
        elif fault == "truncate":
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            super().do_GET()


class LoopbackServer:
    def __init__(self, root: Path):
        self.root = root
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.httpd.plan, self.httpd.hits, self.httpd.stall_s = {}, Counter(), 2.0
        self.httpd.handle_error = lambda request, address: None  # clients that gave up: expected here
        self.plan, self.hits = self.httpd.plan, self.httpd.hits
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def http_server(tmp_path) -> LoopbackServer:
    """A real HTTP server on 127.0.0.1 serving `server.root` (a fresh folder)."""
    root = tmp_path / "www"
    root.mkdir()
    server = LoopbackServer(root)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on a loopback port nothing listens on: connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _mlflow_uri_variables_restored(monkeypatch):
    """`mlflow.set_tracking_uri`/`set_registry_uri` (some tests call them) also write
    MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into os.environ; put both back after every test so no test's
    store leaks into a later test or the subprocesses it starts."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        value = os.environ.get(var)
        monkeypatch.setenv(var, value or "unset")  # records the original (or its absence) for undo
        if value is None:
            monkeypatch.delenv(var)
    yield


@pytest.fixture
def small_fs(tmp_path):
    """`small_fs(size, name)` mounts a tmpfs of `size` (mount's syntax: "64k", "2m") at tmp_path/name:
    a real filesystem that fills up (ENOSPC from the kernel). Skipped, saying why, where this process
    may not mount (not root, no CAP_SYS_ADMIN in a container, no mount binary)."""
    import shutil
    import subprocess

    mounted = []

    def mount(size: str, name: str = "fs") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no `mount` binary: cannot make a small real filesystem")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "minibert-test", str(folder)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); needs root or CAP_SYS_ADMIN")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
