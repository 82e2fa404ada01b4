"""Probes: the book's shapes, <unk> handling, the table, the crane similarity, the stage's outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_project import pretrain_run

from minibert.config import ModelConfig, ProbeConfig, ProbeSpec
from minibert.data.vocab import SPECIALS, Vocab
from minibert.errors import DataError, MinibertError
from minibert.evaluation.probes import UnknownWordWarning, encode_probe, flat_metrics, run_probes, similarity_matrix
from minibert.model.bert import build_model, save_pretrained
from minibert.tracking.store import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a crane is flying driver came he just left".split()
BOOK = ProbeConfig(sentences=(ProbeSpec("crane_flying", "a crane is flying", word="crane"),
                              ProbeSpec("crane_driver", "a crane driver came", "he just left", word="crane")))
TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(SPECIALS + tuple(WORDS))


@pytest.fixture(scope="module")
def book_model(vocab):
    return build_model(ModelConfig(), len(vocab), seed=0)  # the book's sizes: 2 layers, 128 hidden


def test_book_shapes_and_tokens(book_model, vocab):
    toks, segs, enc = encode_probe(book_model, vocab, BOOK.sentences[0])
    assert enc.shape == (1, 6, 128)
    assert toks == ["<cls>", "a", "crane", "is", "flying", "<sep>"] and segs == [0] * 6
    toks, segs, enc = encode_probe(book_model, vocab, BOOK.sentences[1])
    assert enc.shape == (1, 10, 128)
    assert toks == ["<cls>", "a", "crane", "driver", "came", "<sep>", "he", "just", "left", "<sep>"]
    assert segs == [0] * 6 + [1] * 4


def test_probe_is_eval_mode_and_unpadded_equals_padded(book_model, vocab):
    """Dropout is 0.2: two calls on a model left in train mode agree, and match a padded batch row."""
    spec = BOOK.sentences[1]
    book_model.train()
    try:
        _, _, a = encode_probe(book_model, vocab, spec)
        _, _, b = encode_probe(book_model, vocab, spec)
        assert book_model.training
    finally:
        book_model.eval()
    assert torch.equal(a, b)
    toks, segs, _ = encode_probe(book_model, vocab, spec)
    ids = torch.tensor([vocab.encode(toks) + [0] * 7, [3, 4] + [0] * 15])  # (2, 17): padded batch
    seg = torch.tensor([segs + [0] * 7, [0] * 17])
    with torch.no_grad():
        padded = book_model.encode(ids, seg, torch.tensor([10, 2]))  # (2, 17, 128)
    torch.testing.assert_close(padded[0, :10], a[0], atol=1e-5, rtol=1e-5)


def test_unknown_words_become_unk_with_a_warning(book_model, vocab):
    spec = ProbeSpec("heron", "A Heron is flying", "egrets FLYING", word="heron")
    with pytest.warns(UnknownWordWarning, match="heron, egrets") as rec:
        toks, _, enc = encode_probe(book_model, vocab, spec)
    assert len(rec) == 1  # one line per probe
    assert toks == ["<cls>", "a", "<unk>", "is", "flying", "<sep>", "<unk>", "flying", "<sep>"]
    assert enc.shape == (1, 9, 128)


def test_too_long_probe_is_one_line_error(vocab):
    model = build_model(TINY, len(vocab), seed=0)
    with pytest.raises(MinibertError, match="max_len 13"):
        encode_probe(model, vocab, ProbeSpec("long", " ".join(["a"] * 12)))


def test_table_metrics_and_similarity(book_model, vocab):
    table, metrics, sim, labels = run_probes(book_model, vocab, BOOK)
    assert len(table) == 6 + 10 == len(labels) == sim.shape[0] == sim.shape[1]
    assert list(table.columns[:6]) == ["probe", "word", "token", "position", "segment", "norm"]
    assert {"v0", "v1", "v2", "v3"} <= set(table.columns)
    vecs = {s.name: encode_probe(book_model, vocab, s)[2][0] for s in BOOK.sentences}  # (T, H) each
    for name, v in vecs.items():
        rows = table[table.probe == name]
        assert rows.position.tolist() == list(range(len(v)))
        np.testing.assert_allclose(rows.norm, v.norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(rows.v3, v[:, 3].numpy(), rtol=1e-5)
        assert metrics["probes"][name]["shape"] == [1, len(v), 128]
        assert metrics["probes"][name]["cls_norm"] == pytest.approx(float(v[0].norm()), rel=1e-5)
    want = F.cosine_similarity(vecs["crane_flying"][2], vecs["crane_driver"][2], dim=0).item()
    assert list(metrics["similarity"]) == ["crane_flying~crane_driver.crane"]
    got = metrics["similarity"]["crane_flying~crane_driver.crane"]
    assert -1.0 <= got <= 1.0 and got == pytest.approx(want, abs=1e-5)
    assert sim[2, 6 + 2] == pytest.approx(want, abs=1e-5)  # heatmap cell crane × crane
    assert np.all(np.abs(sim) <= 1.0) and np.allclose(np.diag(sim), 1.0)
    assert labels[2] == "crane_flying:crane" and labels[11] == "crane_driver:<sep>"
    assert flat_metrics(metrics)["probe_similarity.crane_flying-vs-crane_driver.crane"] == got


def test_similarity_only_for_shared_words(vocab):
    model = build_model(TINY, len(vocab), seed=0)
    cfg = ProbeConfig(sentences=(ProbeSpec("p1", "a crane is flying", word="crane"),
                                 ProbeSpec("p2", "he just left", word="he"),
                                 ProbeSpec("p3", "crane driver came", word="Crane"),
                                 ProbeSpec("p4", "he came", word="he"),
                                 ProbeSpec("p5", "a crane", word=None)))
    _, metrics, _, _ = run_probes(model, vocab, cfg)
    assert sorted(metrics["similarity"]) == ["p1~p3.crane", "p2~p4.he"]
    assert "word_norm" not in metrics["probes"]["p5"]
    assert similarity_matrix(np.zeros((2, 3))).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_vocab_size_mismatch_errors(vocab):
    with pytest.raises(DataError, match="entries"):
        run_probes(build_model(TINY, 99, seed=0), vocab, BOOK)


def _stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "stages.probe", "--params", "params.yaml", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_stage_writes_outputs_and_logs_into_the_pretrain_run(tmp_path, vocab, monkeypatch):
    from mlflow import MlflowClient  # tests may import mlflow; the package may not

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    save_pretrained(build_model(TINY, len(vocab), seed=0), tmp_path / "models", {"vocab_sha256": vocab.sha256})
    vocab.save(tmp_path / "data/tokens/vocab.txt")
    sentences = [{"name": "crane_flying", "a": "a crane is flying", "word": "crane"},
                 {"name": "crane_driver", "a": "a crane driver came", "b": "he just left", "word": "crane"},
                 {"name": "heron", "a": "a heron is flying", "word": "heron"},
                 {"name": "crane_alone", "a": "crane", "word": "crane"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "pairs": {"max_len": 13}, "model": {"max_len": 13}, "probe": {"sentences": sentences, "word_similarity": []},
        "tracking": {"enabled": True, "experiment": "probe-13"}}))
    run_id = pretrain_run(tmp_path, "probe-13")
    proc = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    warn = [line for line in proc.stderr.splitlines() if line.startswith("warning: probe:")]
    assert len(warn) == 1 and "heron" in warn[0]
    table = pd.read_parquet(tmp_path / "probes/probe_table.parquet")
    assert len(table) == 6 + 10 + 6 + 3 and table.token.tolist().count("<unk>") == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "probes/probe_table.csv"), table, check_dtype=False)
    assert (tmp_path / "plots/probe_similarity.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "metrics/probe.json").read_text())
    assert metrics["probes"]["crane_driver"]["shape"] == [1, 10, 12]
    assert metrics["probes"]["heron"]["unknown"] == 1
    assert sorted(metrics["similarity"]) == ["crane_driver~crane_alone.crane", "crane_flying~crane_alone.crane",
                                             "crane_flying~crane_driver.crane"]
    client = MlflowClient(tracking_uri(tmp_path))
    logged = client.get_run(run_id).data.metrics
    sim = metrics["similarity"]["crane_flying~crane_driver.crane"]
    assert logged["probe_similarity.crane_flying-vs-crane_driver.crane"] == pytest.approx(sim)
    assert logged["probe_cls_norm.heron"] == pytest.approx(metrics["probes"]["heron"]["cls_norm"])
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "probe")}
    assert names == {"probe_table.parquet", "probe_table.csv", "probe_similarity.png", "probe.json"}


def test_stage_missing_model_is_one_line(tmp_path, vocab):
    vocab.save(tmp_path / "data/tokens/vocab.txt")
    (tmp_path / "params.yaml").write_text("tracking:\n  enabled: false\n")
    proc = _stage(tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "pretrain" in proc.stderr
    assert not (tmp_path / "metrics/probe.json").exists()


class _DeviceRecorder(torch.nn.Module):
    """A stand-in model whose weights live on the meta device: records where its inputs were built."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.vocab_size, self.cfg, self.seen = vocab_size, ModelConfig(hidden=12, heads=3), []

    def encode(self, tokens, segments, valid_lens):
        self.seen += [t.device.type for t in (tokens, segments, valid_lens)]
        return torch.zeros(*tokens.shape, 12)


def test_encode_probe_builds_its_inputs_on_the_models_device():
    vocab = Vocab(SPECIALS + ("crane", "flying"))
    model = _DeviceRecorder(len(vocab))
    encode_probe(model, vocab, ProbeSpec("p", "crane flying"))
    assert model.seen == ["meta"] * 3


def test_stage_word_similarity_against_scipy(tmp_path, task_data, monkeypatch):
    """Spearman of the embedding cosines on SimLex-999's in-vocabulary pairs, recomputed here with scipy
    from the saved weights; the untrained control is the pretrain seed's initialisation."""
    from mlflow import MlflowClient
    from scipy.stats import spearmanr

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pairs = [line.split("\t") for line in (task_data / "simlex999.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    words = sorted({w.lower() for p in pairs[::7] for w in p[:2]})  # every 7th pair's words: 1/7 of pairs or more
    vocab = Vocab(SPECIALS + tuple(words))
    trained = build_model(TINY, len(vocab), seed=11)
    save_pretrained(trained, tmp_path / "models", {"vocab_sha256": vocab.sha256})
    vocab.save(tmp_path / "data/tokens/vocab.txt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "pairs": {"max_len": 13}, "model": {"max_len": 13}, "train": {"seed": 5},
        "probe": {"sentences": [{"name": "one", "a": words[0]}], "word_similarity": ["simlex999"]},
        "tracking": {"enabled": True, "experiment": "probe-13"}}))
    run_id = pretrain_run(tmp_path, "probe-13")
    proc = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "metrics/probe.json").read_text())["word_similarity"]["simlex999"]
    known = [(a.lower(), b.lower(), float(h)) for a, b, h in (p[:3] for p in pairs)
             if a.lower() in words and b.lower() in words]
    assert got["trained"]["pairs"] == len(known) >= 999 // 7 and got["trained"]["total"] == 999

    def rho(model):
        emb = model.token_embedding.weight.detach().double()
        cos = [float(F.cosine_similarity(emb[vocab.id(a)], emb[vocab.id(b)], dim=0)) for a, b, _ in known]
        return spearmanr(cos, [h for _, _, h in known]).statistic

    assert got["trained"]["spearman_embedding"] == pytest.approx(rho(trained), abs=1e-9)
    assert got["untrained"]["spearman_embedding"] == pytest.approx(rho(build_model(TINY, len(vocab), seed=5)), abs=1e-9)
    logged = MlflowClient(tracking_uri(tmp_path)).get_run(run_id).data.metrics
    assert logged["word_rho_embedding.simlex999"] == pytest.approx(got["trained"]["spearman_embedding"])
    assert logged["word_rho_context.simlex999_untrained"] == pytest.approx(got["untrained"]["spearman_context"])
