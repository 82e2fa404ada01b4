"""Held-out metrics: a tiny real model on synthetic pairs, checked against a direct computation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_project import pretrain_run

from minibert.artifacts import save_arrays
from minibert.config import ModelConfig, PairsConfig
from minibert.data.pairs import make_pairs
from minibert.data.vocab import SPECIALS
from minibert.errors import DataError
from minibert.evaluation.heldout import baselines, evaluate, heldout_hook, heldout_subset, load_pairs
from minibert.model.bert import build_model, load_pretrained, save_pretrained
from minibert.tracking.runs import pretrain_run_id
from minibert.tracking.store import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
V = 99
CFG = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
SHA = "ab" * 32


def synthetic_split(rng: np.random.Generator, n_para: int = 37) -> dict[str, np.ndarray]:
    """Paragraphs of short sentences; Zipf-like ids so a biased MLM head gets some slots right."""
    n_sent = rng.integers(2, 6, n_para)
    lens = rng.integers(1, 5, n_sent.sum())
    p = 1.0 / np.arange(1, V - len(SPECIALS) + 1)
    ids = rng.choice(np.arange(len(SPECIALS), V), size=lens.sum(), p=p / p.sum())
    return {"ids": ids.astype(np.int32),
            "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}


@pytest.fixture(scope="module")
def pairs() -> dict[str, np.ndarray]:
    out = make_pairs(synthetic_split(np.random.default_rng(13)), PairsConfig(max_len=13), V,
                     np.random.default_rng(7))
    assert len(out["nsp_labels"]) > 50
    return out


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, V, seed=0)
    with torch.no_grad():  # favour the most frequent word so MLM accuracy is not trivially 0
        m.mlm[-1].bias[len(SPECIALS)] += 4.0
    return m.eval()


def direct(model, pairs, rows) -> dict:
    """Per example, by hand: encode, gather the real slots, log-softmax, argmax."""
    mlm_nll, mlm_hit, nsp_nll, nsp_hit = [], [], [], []
    with torch.no_grad():
        for i in rows:
            tok = torch.as_tensor(pairs["token_ids"][i : i + 1], dtype=torch.long)  # (1, T)
            seg = torch.as_tensor(pairs["segments"][i : i + 1], dtype=torch.long)
            enc = model.encode(tok, seg, torch.as_tensor(pairs["valid_lens"][i : i + 1]))[0]  # (T, H)
            for pos, w, label in zip(pairs["pred_positions"][i], pairs["mlm_weights"][i], pairs["mlm_labels"][i]):
                if w > 0:
                    logp = torch.log_softmax(model.mlm(enc[int(pos)]), -1)  # (V,)
                    mlm_nll.append(-float(logp[int(label)]))
                    mlm_hit.append(int(logp.argmax()) == int(label))
            logp = torch.log_softmax(model.nsp(model.nsp_hidden(enc[0])), -1)  # (2,)
            nsp_nll.append(-float(logp[int(pairs["nsp_labels"][i])]))
            nsp_hit.append(int(logp.argmax()) == int(pairs["nsp_labels"][i]))
    return {"mlm_loss": np.mean(mlm_nll), "mlm_accuracy": np.mean(mlm_hit), "nsp_loss": np.mean(nsp_nll),
            "nsp_accuracy": np.mean(nsp_hit), "examples": len(rows), "mlm_slots": len(mlm_nll)}


def test_matches_direct_computation(model, pairs):
    rows = list(range(11))
    sub = {k: v[rows] for k, v in pairs.items()}
    got = evaluate(model, sub, batch_size=4, device="cpu")
    want = direct(model, pairs, rows)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    assert got["mlm_perplexity"] == pytest.approx(math.exp(got["mlm_loss"]), rel=1e-12)


def test_deterministic_and_batch_size_independent(model, pairs):
    a, b = evaluate(model, pairs, 7, "cpu"), evaluate(model, pairs, 7, "cpu")
    assert a == b
    big = evaluate(model, pairs, 1024, "cpu")
    assert big.keys() == a.keys()
    for k in a:
        assert big[k] == pytest.approx(a[k], abs=1e-6), k
    assert a["examples"] == len(pairs["nsp_labels"]) and a["mlm_slots"] == int(pairs["mlm_weights"].sum())
    assert 0 < a["mlm_accuracy"] < 1 and 0 < a["nsp_accuracy"] < 1


def test_dropout_off_and_mode_restored(model, pairs):
    """A model handed over in train mode is scored without dropout and handed back in train mode."""
    want = evaluate(model, pairs, 13, "cpu")
    model.train()
    try:
        assert evaluate(model, pairs, 13, "cpu") == want
        assert model.training
    finally:
        model.eval()


def test_heldout_subset_is_evenly_spaced_and_fixed(pairs):
    n = len(pairs["nsp_labels"])
    sub = heldout_subset(pairs, 13)
    rows = [i * n // 13 for i in range(13)]  # 0, n/13, 2n/13, ...: spread over the whole split
    for k in pairs:
        np.testing.assert_array_equal(sub[k], pairs[k][rows])
    whole = heldout_subset(pairs, n + 7)  # asking for more than there is: all of them, in order
    np.testing.assert_array_equal(whole["token_ids"], pairs["token_ids"])


def test_heldout_hook_is_evaluate_prefixed(model, pairs):
    got = heldout_hook(model, pairs, 7, "cpu")(37)
    want = evaluate(model, pairs, 7, "cpu")
    assert got == {f"valid_{k}": want[k] for k in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")}


def test_baselines_by_hand():
    """Train: masked words 5, 5, 5, 6, 7 (plus an unused slot holding label 0), NSP labels 1, 1, 0.
    Valid: words 5, 6, 8 and NSP labels 1, 0, 0, 0. Vocabulary of 9 entries."""
    train = {"mlm_labels": np.array([[5, 5, 0], [5, 6, 7]]), "mlm_weights": np.array([[1, 1, 0], [1, 1, 1]], "f4"),
             "nsp_labels": np.array([1, 1, 0])}
    valid = {"mlm_labels": np.array([[5, 6], [8, 0]]), "mlm_weights": np.array([[1, 1], [1, 0]], "f4"),
             "nsp_labels": np.array([1, 0, 0, 0])}
    got = baselines(train, valid, vocab_size=9)
    # add-one smoothing: (count + 1) / (5 slots + 9 entries): p(5) = 4/14, p(6) = 2/14, p(8) = 1/14
    assert got["baseline_unigram_mlm_loss"] == pytest.approx(-(math.log(4 / 14) + math.log(2 / 14) + math.log(1 / 14)) / 3)
    assert got["baseline_unigram_mlm_accuracy"] == pytest.approx(1 / 3)  # always "5": right on 1 of 3 slots
    assert got["baseline_majority_nsp_accuracy"] == pytest.approx(1 / 4)  # always 1: right on 1 of 4 pairs
    assert got["baseline_majority_nsp_loss"] == pytest.approx(-(math.log(2 / 3) + 3 * math.log(1 / 3)) / 4)
    with pytest.raises(DataError, match="vocabulary size 8"):
        baselines(train, valid, vocab_size=8)  # label 8 cannot be a word of an 8-entry vocabulary


def test_load_pairs_and_run_id(tmp_path, pairs):
    save_arrays(tmp_path / "v.safetensors", pairs, {"vocab_sha256": SHA})
    arrays, meta = load_pairs(tmp_path / "v.safetensors")
    assert meta["vocab_sha256"] == SHA and np.array_equal(arrays["token_ids"], pairs["token_ids"])
    with pytest.raises(DataError, match="dvc repro pairs"):
        load_pairs(tmp_path / "nope.safetensors")
    assert pretrain_run_id(tmp_path / "train.json") is None
    (tmp_path / "train.json").write_text(json.dumps({"mlflow_run_id": ""}))
    assert pretrain_run_id(tmp_path / "train.json") is None
    (tmp_path / "train.json").write_text(json.dumps({"mlflow_run_id": "abc"}))
    assert pretrain_run_id(tmp_path / "train.json") == "abc"


def _stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", "params.yaml", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _workspace(root: Path, model, pairs, sha: str = SHA) -> Path:
    save_pretrained(model, root / "models", {"vocab_sha256": SHA, "step": 37})
    save_arrays(root / "data/pairs/valid.safetensors", pairs, {"vocab_sha256": sha})
    train = make_pairs(synthetic_split(np.random.default_rng(99)), PairsConfig(max_len=13), V, np.random.default_rng(3))
    save_arrays(root / "data/pairs/train.safetensors", train, {"vocab_sha256": SHA})
    (root / "params.yaml").write_text(yaml.safe_dump({"eval": {"batch_size": 7},
                                                      "tracking": {"enabled": True, "experiment": "eval-13"}}))
    return root


def test_stage_writes_metrics_into_the_pretrain_run(tmp_path, model, pairs, monkeypatch):
    from mlflow import MlflowClient  # tests may import mlflow; the package may not

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _workspace(tmp_path, model, pairs)
    run_id = pretrain_run(root, "eval-13")
    proc = _stage(root)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((root / "metrics/eval.json").read_text())
    reloaded, _ = load_pretrained(root / "models")
    want = evaluate(reloaded, pairs, 1024, "cpu")
    want.update(baselines(load_pairs(root / "data/pairs/train.safetensors")[0], pairs, V))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=2e-6), k
    client = MlflowClient(tracking_uri(root))
    run = client.get_run(run_id)
    for k in ("mlm_loss", "mlm_perplexity", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "examples"):
        assert run.data.metrics[f"valid_{k}"] == pytest.approx(got[k]), k
        # at the model's step: the verdict ends the held-out curve pretrain logs on a subset
        assert [m.step for m in client.get_metric_history(run_id, f"valid_{k}")] == [37], k
    for k in ("baseline_unigram_mlm_loss", "baseline_unigram_mlm_accuracy", "baseline_majority_nsp_loss",
              "baseline_majority_nsp_accuracy"):
        assert run.data.metrics[k] == pytest.approx(got[k]), k
    assert run.info.status == "FINISHED"


def test_stage_one_line_errors(tmp_path, model, pairs):
    root = _workspace(tmp_path, model, pairs, sha="cd" * 32)
    proc = _stage(root)  # no metrics/train.json: nothing to log into, but the vocab check fails first
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: evaluate:") and "differs" in proc.stderr
    proc = _stage(root, "--models", "nowhere")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "pretrain" in proc.stderr
    proc = _stage(root, "--pairs", "nowhere.safetensors")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "dvc repro pairs" in proc.stderr
    assert not (root / "metrics/eval.json").exists()


def test_heldout_batch_size_is_capped_by_the_rank_share_and_128_pairs():
    from minibert.evaluation.heldout import heldout_batch_size

    assert heldout_batch_size(1024, 512) == 128            # the defaults: 128 pairs a pass, whatever micro_batches is
    assert heldout_batch_size(1024, 100, world=2) == 50     # a rank's share of a small batch
    assert heldout_batch_size(37, 512) == 37                # eval.batch_size is the cap
    assert heldout_batch_size(1024, 1, world=2) == 1        # never zero
