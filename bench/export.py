"""Parity of the Hugging Face export and latency of the served text model, at the book's model size.

    python -m bench.export [--requests 20]

Builds the book's BERT (2 layers, hidden 128, 2 heads, FFN 256, max_len 64) over a 20256-word
vocabulary, seeded (latency and parity do not depend on training). Prints JSON:
- `parity`: max |diff| between minibert's own forward and `transformers` loading the exported folder
  (post- and pre-LN): encodings, MLM logits, NSP logits, fill-mask top-5 scores (pipeline).
- `serve`: the model logged and registered as minibert's text pyfunc in a temp sqlite store, then
  `mlflow models serve --env-manager local` (1 worker) on 127.0.0.1: median and p90 latency of
  POST /invocations for one sentence and for a batch of 64, over `--requests` requests each.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from minibert import layout
from minibert.config import ModelConfig, TrackingConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.model.bert import build_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["a crane is flying over the river", "he just left the bank", "the bird sat on the old wall",
             "she said that the <mask> was flying"]


def book_model(norm: str):
    vocab = Vocab(SPECIALS + ("a", "crane", "is", "flying", "the", "river") + tuple(f"w{i}" for i in range(20256 - 11)))
    return build_model(ModelConfig(norm=norm), len(vocab), seed=0).eval(), vocab


def parity(norm: str) -> dict[str, float]:
    from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer, pipeline

    from minibert.config import ProbeSpec
    from minibert.evaluation.probes import encode_probe
    from minibert.export.hf import export_hf

    bert, vocab = book_model(norm)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_hf(bert, vocab, {"step": 0}, Path(tmp) / "hf")
        tok = AutoTokenizer.from_pretrained(out)
        enc_model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        pre = AutoModelForPreTraining.from_pretrained(out, trust_remote_code=True).eval()
        fill = pipeline("fill-mask", model=str(out), trust_remote_code=True, device="cpu")
        d = {"encoding": 0.0, "mlm_logits": 0.0, "nsp_logits": 0.0, "fill_mask_score": 0.0}
        for a, b in [("a crane is flying", None), ("a crane is flying", "the river w7 w99")]:
            _, _, want = encode_probe(bert, vocab, ProbeSpec("x", a, b))  # (1, T, H)
            x = tok(a, b, return_tensors="pt") if b else tok(a, return_tensors="pt")
            T = x["input_ids"].shape[1]
            with torch.no_grad():
                d["encoding"] = max(d["encoding"], (enc_model(**x).last_hidden_state - want).abs().max().item())
                mlm, nsp = bert(x["input_ids"], x["token_type_ids"], torch.tensor([T]), torch.arange(T)[None],
                                torch.ones(1, T))
                o = pre(**x)
            d["mlm_logits"] = max(d["mlm_logits"], (o.prediction_logits[0] - mlm).abs().max().item())
            d["nsp_logits"] = max(d["nsp_logits"], (o.seq_relationship_logits - nsp).abs().max().item())
        ids = vocab.encode(["<cls>", "the", "<mask>", "is", "flying", "<sep>"])
        with torch.no_grad():
            mlm, _ = bert(torch.tensor([ids]), torch.zeros(1, 6, dtype=torch.long), torch.tensor([6]),
                          torch.tensor([[2]]), torch.ones(1, 1))
        want = torch.topk(torch.softmax(mlm[0].double(), -1), 5).values.numpy()
        got = np.array([g["score"] for g in fill("the <mask> is flying", top_k=5)])
        d["fill_mask_score"] = float(np.abs(got - want).max())
    return d


def _post(url: str, rows: list[dict]) -> float:
    req = urllib.request.Request(url + "/invocations", json.dumps({"inputs": rows}).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - t0


def serve_latency(requests: int) -> dict[str, float]:
    from minibert.tracking.registry import register_version
    from minibert.tracking.runs import start_run
    from minibert.tracking.serving import log_text_model
    from tests.mlflow_server import free_port

    bert, vocab = book_model("post")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_pretrained(bert, root / layout.MODELS, {"vocab_sha256": vocab.sha256})
        vocab.save(root / "vocab.txt")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        with start_run(TrackingConfig(experiment="bench"), root) as tracker:
            uri = log_text_model(tracker, root / layout.MODELS, root / "vocab.txt")
            register_version(tracker, "bench-encoder", uri, {})
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/bench-encoder/1",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench.export: the model server did not come up")
                try:
                    urllib.request.urlopen(url + "/ping", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.5)
            one = [{"text": SENTENCES[0]}]
            batch = [{"text": SENTENCES[i % 3], "pair": SENTENCES[(i + 1) % 3]} for i in range(64)]
            out = {}
            for name, rows in (("one_sentence", one), ("batch_64_pairs", batch)):
                _post(url, rows)  # warm-up
                t = np.array([_post(url, rows) for _ in range(requests)]) * 1000
                out[f"{name}_median_ms"] = round(float(np.median(t)), 1)
                out[f"{name}_p90_ms"] = round(float(np.percentile(t, 90)), 1)
            return out
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"parity": {norm: parity(norm) for norm in ("post", "pre")}, "serve": serve_latency(args.requests),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
