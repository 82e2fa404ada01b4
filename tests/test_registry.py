"""The MLflow Model Registry and the text-in pyfunc, against real MLflow (sqlite) and a real
`mlflow models serve` process on 127.0.0.1.

Expectations: the champion policy from hand-worked version tables; served encodings and fill-mask
words from minibert's own code (`load_pretrained` + `encode_probe` / the MLM head, one unpadded
example at a time), not from the pyfunc's batched path.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from mlflow import MlflowClient  # noqa: E402  (tests read back through MLflow's own client)
from mlflow_server import free_port  # noqa: E402
from tiny_project import ROOT, make_workspace, stage  # noqa: E402

from minibert.config import ProbeSpec, TrackingConfig  # noqa: E402
from minibert.data.vocab import MASK, Vocab  # noqa: E402
from minibert.evaluation.probes import encode_probe, probe_words  # noqa: E402
from minibert.model.bert import load_pretrained  # noqa: E402
from minibert.tracking.registry import set_champion  # noqa: E402
from minibert.tracking.runs import start_run

NAME = "minibert-encoder"


# ---------------------------------------------------------------------------- champion policy


def test_champion_is_best_loss_on_the_same_heldout_set(tmp_path, monkeypatch):
    """Hand-worked: (loss, held-out sha) per version -> expected champion after each evaluation."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("policy")
    steps = [  # (valid_mlm_loss, held-out set, champion expected afterwards)
        (5.0, "A", "1"),
        (4.0, "A", "2"),  # better on A
        (4.5, "A", "2"),  # worse: champion stays
        (9.0, "B", "4"),  # another held-out set: compared only with versions evaluated on B
        (4.0, "A", "2"),  # tie with v2: the older version keeps the alias
        (3.9, "A", "6"),
    ]
    for loss, heldout, want in steps:
        with start_run(TrackingConfig(experiment="policy"), tmp_path) as tracker:
            client.create_model_version("policy", f"file://{tmp_path}/none", run_id=tracker.run_id,
                                        tags={"mlflow_run_id": tracker.run_id})
            assert set_champion(tracker, "policy", heldout, loss) == want
        assert str(client.get_model_version_by_alias("policy", "champion").version) == want
    with start_run(TrackingConfig(experiment="policy"), tmp_path) as tracker:  # registration off
        assert set_champion(tracker, "", "A", 0.1) is None
        assert set_champion(tracker, "policy", "A", 0.1) is None  # this run registered no version
    assert str(client.get_model_version_by_alias("policy", "champion").version) == "6"


def test_champion_compares_losses_as_numbers_across_digit_counts(tmp_path, monkeypatch):
    """Hand-worked: losses whose decimal strings sort the other way ("10.5" < "9.8" < "9.75" as text;
    10.5 > 9.8 > 9.75 as numbers), the tags MLflow stores being strings."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("digits")
    for loss, want in ((10.5, "1"), (9.8, "2"), (100.25, "2"), (9.75, "4"), (10.0, "4")):
        with start_run(TrackingConfig(experiment="digits"), tmp_path) as tracker:
            client.create_model_version("digits", f"file://{tmp_path}/none", run_id=tracker.run_id,
                                        tags={"mlflow_run_id": tracker.run_id})
            assert set_champion(tracker, "digits", "A", loss) == want, loss
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "4"


# ---------------------------------------------------------------------------- pipeline + serving


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny workspace whose publish stage registered pretrain's model as version 1 and made it champion."""
    root = make_workspace(tmp_path_factory.mktemp("ws"), train={"max_steps": 3}, tracking=True)
    stage(root, "pretrain")
    stage(root, "evaluate")
    out = stage(root, "publish").stdout
    assert f"{NAME} version 1" in out and f"{NAME}@champion = version 1" in out
    return root


def test_publish_registers_and_tags_the_version(registered):
    uri = f"sqlite:///{registered}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    run_id = json.loads((registered / "metrics/train.json").read_text())["mlflow_run_id"]
    v = client.get_model_version_by_alias(NAME, "champion")
    assert str(v.version) == "1" and v.run_id == run_id
    import hashlib
    sha = hashlib.sha256((registered / "data/pairs/valid.safetensors").read_bytes()).hexdigest()
    assert v.tags["valid_pairs_sha256"] == sha
    assert float(v.tags["valid_mlm_loss"]) == json.loads((registered / "metrics/eval.json").read_text())["mlm_loss"]
    assert v.tags["vocab_sha256"] == Vocab.load(registered / "data/tokens/vocab.txt").sha256
    model_dir = next(p for p in (registered / "mlartifacts").rglob("MLmodel") if "pyfunc_model.py" in p.read_text()).parent
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pt", ".pth", ".pyc")]  # no pickles
    assert (model_dir / "artifacts/model/bert.safetensors").is_file()


def cli(root, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "minibert.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_encode_from_the_registered_champion(registered):
    via_registry = cli(registered, "encode", "--model", f"models:/{NAME}@champion", "w5 w6 w7")
    local = cli(registered, "encode", "--checkpoint", "models", "w5 w6 w7")
    assert via_registry.returncode == 0, via_registry.stderr
    assert via_registry.stdout == local.stdout and "w6" in local.stdout
    run_id = json.loads((registered / "metrics/train.json").read_text())["mlflow_run_id"]
    export = cli(registered, "export", "hf", "hf-run", "--run", run_id)  # weights + figures from the run
    assert export.returncode == 0, export.stderr
    loss = json.loads((registered / "metrics/eval.json").read_text())["mlm_loss"]
    assert f"| mlm_loss | {loss:.4f} |" in (registered / "hf-run/README.md").read_text()
    bad = cli(registered, "encode", "--model", f"models:/{NAME}@nope", "w5")
    assert bad.returncode == 1 and bad.stderr.startswith("error: encode: ") and len(bad.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def served(registered):
    """`minibert serve` (mlflow models serve of the champion) on a free port, started the way a user without
    the virtual environment on PATH would: MLflow runs `uvicorn` from PATH, which then is not there."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != bin_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store, found by `minibert serve`
    log = open(registered / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "minibert.cli", "serve", "--port", str(port)],
                            cwd=registered, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (registered / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server not up after 180 s"
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        said = (registered / "serve.log").read_text()
        assert f"models:/{NAME}@champion (version 1) at {url}/invocations" in said, said[-2000:]
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_served_encodings_match_minibert(registered, served):
    model, _ = load_pretrained(registered / "models")
    vocab = Vocab.load(registered / "data/tokens/vocab.txt")
    rows = [{"text": "w5 W6 w7 w8 w9"}, {"text": "w10", "pair": "w11 zebra"}, {"text": "w12 w13"}]  # mixed lengths
    status, body = post(served, {"inputs": rows})
    assert status == 200, body
    for row, got in zip(rows, body["predictions"]):
        spec = ProbeSpec("x", row["text"], row.get("pair"))
        tokens, segments, enc = encode_probe(model, vocab, spec)  # one unpadded example: (1, T, H)
        assert got["tokens"] == tokens and got["segments"] == segments
        assert np.abs(np.array(got["encoding"]) - enc[0].numpy()).max() < 1e-5


def test_served_fill_mask_matches_the_mlm_head(registered, served):
    model, _ = load_pretrained(registered / "models")
    vocab = Vocab.load(registered / "data/tokens/vocab.txt")
    texts = ["w5 <mask> w7", "<mask> w9 <mask> w20 w21"]
    status, body = post(served, {"inputs": [{"text": t} for t in texts], "params": {"mode": "fill-mask", "top_k": 4}})
    assert status == 200, body
    for text, got in zip(texts, body["predictions"]):
        words, _ = probe_words(ProbeSpec("x", text))
        ids = vocab.encode(words)
        where = [i for i, w in enumerate(ids) if w == MASK]
        assert [m["position"] for m in got["masks"]] == where
        for pos, m in zip(where, got["masks"]):
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids]), torch.zeros(1, len(ids), dtype=torch.long),
                                  torch.tensor([len(ids)]), torch.tensor([[pos]]), torch.ones(1, 1))  # (1, V)
            p = torch.softmax(logits[0].double(), -1)
            top = torch.topk(p, 4)
            assert m["words"] == vocab.decode(top.indices.tolist())
            assert np.allclose(m["scores"], top.values.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": [{"text": ""}]}, "row 0: text is empty"),
    ({"inputs": [{"text": "w5"}, {"text": "   "}]}, "row 1: text is empty"),
    ({"inputs": [{"text": " ".join(["w5"] * 40)}]}, "exceed max_len 29"),
    ({"inputs": [{"text": 5}]}, "row 0: text must be a string"),
    ({"inputs": [{"text": "w5", "pair": 7}]}, "row 0: pair must be a string"),
    ({"inputs": [{"sentence": "w5"}]}, "text"),
    ({"inputs": [{"text": "w5 w6"}], "params": {"mode": "fill-mask"}}, "no <mask>"),
    ({"inputs": [{"text": "w5"}], "params": {"mode": "classify"}}, "params.mode"),
])
def test_bad_input_is_a_400_with_a_message(served, body, fragment):
    status, answer = post(served, body)
    assert status == 400, answer
    assert fragment in answer["message"], answer["message"]


def test_fluent_calls_leave_no_tracking_or_registry_uri_behind(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri/set_registry_uri write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    os.environ; after register_version they must be as before, or the next run of this process (and
    every subprocess it starts, e.g. `mlflow models serve`) would use this run's store."""
    import mlflow

    from minibert.tracking.registry import register_version

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    with start_run(TrackingConfig(experiment="leak"), tmp_path) as tracker:
        register_version(tracker, "leak", f"runs:/{tracker.run_id}/none", {})
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_text_model_builds_its_tensors_on_the_models_device():
    """The pyfunc's rows go where the model is (a GPU-loaded model got CPU tensors before): the stand-in's
    weights are on the meta device and it records its inputs' devices."""
    from minibert.config import ModelConfig
    from minibert.data.vocab import SPECIALS
    from minibert.tracking.serving import encode_rows

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.cfg, self.seen = ModelConfig(), []

        def encode(self, tokens, segments, valid_lens):
            self.seen += [t.device.type for t in (tokens, segments, valid_lens)]
            return torch.zeros(*tokens.shape, 3)

        def forward(self, tokens, segments, valid_lens, positions, weights):
            self.seen += [t.device.type for t in (tokens, segments, valid_lens, positions, weights)]
            return torch.zeros(1, 7), None  # the one <mask> below

    vocab = Vocab(SPECIALS + ("crane", "is"))
    model = Recorder()
    encode_rows(model, vocab, [("a crane is", None), ("crane", "is")], "encode", 1)
    encode_rows(model, vocab, [("a <mask> is", None)], "fill-mask", 2)
    assert model.seen == ["meta"] * 8


def test_serve_without_a_champion_is_one_line(tmp_path):
    """`minibert serve` before any pipeline run: no registered model; one line that says how to make one."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = cli(tmp_path, "serve", "--port", str(free_port()))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: serve: ") and f"models:/{NAME}@champion" in r.stderr and "dvc repro" in r.stderr
    bad = cli(tmp_path, "serve", "--model", "runs:/abc/model")
    assert bad.returncode == 1 and "models:/NAME@ALIAS" in bad.stderr and len(bad.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------- serve's failures, one line each


def one_error_line(r) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: serve: "), r.stderr
    return lines[0]


def test_serve_on_a_taken_port_is_one_line_naming_the_port_and_its_owner(tmp_path):
    """A real socket listens on 127.0.0.1:P; `minibert serve --port P` says so in one line (and which
    process holds it: this one) before MLflow starts, instead of uvicorn's bind error in a traceback."""
    import socket

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli(tmp_path, "serve", "--port", str(port))
        line = one_error_line(r)
        assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line, line
        assert f"pid {os.getpid()}?" in line, line
        assert r.stdout == ""  # nothing was started
        # another host of this machine is another address: the same port there is free, so the host is checked
        other = cli(tmp_path, "serve", "--port", str(port), "--host", "192.0.2.1")  # TEST-NET-1: not ours
        line = one_error_line(other)
        assert "192.0.2.1 is not an address of this machine" in line and "--host 127.0.0.1" in line, line
    bad = cli(tmp_path, "serve", "--port", "70000")
    assert "port 70000 is not a TCP port" in one_error_line(bad)


def test_serve_store_that_cannot_be_opened_is_one_line(tmp_path):
    """An mlflow.db that is not an SQLite file: one line naming the store, not SQLAlchemy's traceback."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "mlflow.db").write_bytes(b"not a database\n" * 400)
    line = one_error_line(cli(tmp_path, "serve", "--port", str(free_port())))
    assert f"MLflow store sqlite:///{tmp_path}/mlflow.db could not be opened" in line, line
    assert "file is not a database" in line and "[SQL:" not in line, line


def test_serve_failure_of_the_server_process_is_one_line(tmp_path):
    """The champion resolves in the registry but its files are gone: the real `mlflow models serve` fails
    on its own; minibert says in one line that it exited, why (its last error) and where its output is."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    v = client.create_model_version(NAME, f"file://{tmp_path}/gone/model")
    client.set_registered_model_alias(NAME, "champion", v.version)
    r = cli(tmp_path, "serve", "--port", str(free_port()))
    line = one_error_line(r)
    assert f"the MLflow server for models:/{NAME}@champion exited with code 1" in line, line
    assert "No such artifact: 'MLmodel'" in line, line
    log = Path(line.rsplit("whole output in ", 1)[1])
    assert "Traceback" in log.read_text()  # the whole story is kept, just not on the terminal
    log.unlink()
