"""`minibert export hf`: transformers loads the folder and computes what minibert computes.

Expectations come from minibert's own forward (minibert/model/bert.py: unpadded rows, index scatter,
fused qkv view), an independent code path from the shipped modeling_minibert.py (padded SDPA).
The tiny model has odd sizes and hidden 15 / 3 heads (head dim 5 != heads), so a head/feature
transposition changes the numbers; LayerNorm weights are randomised so swapped norms show too.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, pipeline  # noqa: E402

from minibert.config import ModelConfig, ProbeSpec  # noqa: E402
from minibert.data.vocab import MASK, SPECIALS, Vocab  # noqa: E402
from minibert.evaluation.probes import probe_words  # noqa: E402
from minibert.export.hf import export_hf  # noqa: E402
from minibert.model.bert import build_model  # noqa: E402

WORDS = ("a crane is flying the bird sat on wall he just left driver came über straße ça ok "
         "river bank money").split()
VOCAB = Vocab(SPECIALS + tuple(WORDS) + tuple(f"w{i}" for i in range(37 - len(SPECIALS) - len(WORDS))))
PAIRS = [("a crane is flying", None), ("A Crane   driver came", "he just LEFT"),
         ("the bird sat on the wall", "über Straße ça zebra"), ("ok", "river bank\tmoney w3 w7 w11")]
TOL = 1e-5


def tiny_bert(norm: str):
    tied = norm.endswith("-tied")  # the budget preset's head: decoder = scaled token embedding, no bias
    cfg = ModelConfig(num_layers=2, hidden=15, heads=3, ffn_hidden=13, dropout=0.1, max_len=29,
                      norm=norm.removesuffix("-tied"), tie_decoder=tied, decoder_bias=not tied)
    bert = build_model(cfg, len(VOCAB), seed=13)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if "norm" in name or name.startswith("mlm.2"):  # LayerNorms: not the identity init
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return bert.eval()


@pytest.fixture(scope="module", params=["post", "pre", "pre-tied"])
def exported(request, tmp_path_factory):
    bert = tiny_bert(request.param)
    out = tmp_path_factory.mktemp(f"hf-{request.param}") / "minibert-hf"
    export_hf(bert, VOCAB, {"step": 3, "vocab_sha256": VOCAB.sha256}, out, {"mlm_loss": 3.5, "baseline_mlm_loss": 3.6})
    return bert, out


def minibert_ids(a: str, b: str | None):
    words, segments = probe_words(ProbeSpec("x", a, b))
    return VOCAB.encode(words), segments


def test_folder_layout_and_config(exported):
    bert, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_minibert.py", "README.md", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickles
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForMaskedLM"] == "modeling_minibert.MinibertForMaskedLM"
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).hidden_size == 15
    card = (out / "README.md").read_text()
    assert "baseline_mlm_loss | 3.6000" in card and "trust_remote_code=True" in card


def test_tokenizer_matches_minibert(exported):
    _, out = exported
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3, 4)
    for a, b in PAIRS + [("the <mask> is flying", None), ("a <mask> driver", "<mask> left")]:
        ids, segments = minibert_ids(a, b)
        enc = tok(a, b) if b else tok(a)
        assert enc["input_ids"] == ids, (a, b)
        assert enc["token_type_ids"] == segments, (a, b)


def test_encodings_match_minibert(exported):
    bert, out = exported
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    batch = tok.pad([tok(a, b) if b else tok(a) for a, b in PAIRS], return_tensors="pt")  # mixed single/pair
    lens = batch["attention_mask"].sum(1)  # (B,)
    with torch.no_grad():
        got = hf(**batch).last_hidden_state  # (B, T, H)
        want = bert.encode(batch["input_ids"], batch["token_type_ids"], lens)  # (B, T, H), zeros at pads
    real = batch["attention_mask"].bool()
    diff = (got[real] - want[real]).abs().max().item()
    assert diff < TOL, diff


def minibert_fill_mask(bert, text: str, k: int = 5):
    ids, segments = minibert_ids(text, None)
    pos = ids.index(MASK)
    with torch.no_grad():
        mlm, _ = bert(torch.tensor([ids]), torch.tensor([segments]), torch.tensor([len(ids)]),
                      torch.tensor([[pos]]), torch.tensor([[1.0]]))  # (1, V)
    probs = torch.softmax(mlm[0].double(), -1)
    top = torch.topk(probs, k)
    return [VOCAB.tokens[i] for i in top.indices], top.values.tolist()


def test_fill_mask_pipeline_matches_mlm_head(exported):
    bert, out = exported
    fill = pipeline("fill-mask", model=str(out), trust_remote_code=True, device="cpu")
    for text in ("the <mask> is flying", "a crane <mask> on the wall w5"):
        words, scores = minibert_fill_mask(bert, text)
        got = fill(text, top_k=5)
        assert [g["token_str"] for g in got] == words
        assert np.allclose([g["score"] for g in got], scores, atol=TOL, rtol=0)


def test_nsp_and_mlm_logits_match(exported):
    bert, out = exported
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForPreTraining.from_pretrained(out, trust_remote_code=True).eval()
    mlm_only = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    for a, b in PAIRS:
        ids, segments = minibert_ids(a, b)
        T = len(ids)
        with torch.no_grad():
            mlm, nsp = bert(torch.tensor([ids]), torch.tensor([segments]), torch.tensor([T]),
                            torch.arange(T)[None], torch.ones(1, T))  # every position: (T, V), (1, 2)
            enc = tok(a, b, return_tensors="pt") if b else tok(a, return_tensors="pt")
            out_hf = hf(**enc)
            mlm_hf = mlm_only(**enc).logits
        assert (out_hf.seq_relationship_logits - nsp).abs().max().item() < TOL
        assert (out_hf.prediction_logits[0] - mlm).abs().max().item() < TOL
        assert (mlm_hf[0] - mlm).abs().max().item() < TOL


def test_cli_export_from_models_folder(tmp_path, monkeypatch):
    """`minibert export hf OUT` from models/ + data/tokens/vocab.txt, figures from metrics/eval.json."""
    from typer.testing import CliRunner

    from minibert.cli import app
    from minibert.model.bert import save_pretrained

    bert = tiny_bert("post")
    save_pretrained(bert, tmp_path / "models", {"vocab_sha256": VOCAB.sha256, "step": 3})
    VOCAB.save(tmp_path / "data/tokens/vocab.txt")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"mlm_loss": 3.25, "examples": 99, "baseline_mlm_loss": 3.61}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "hf", "hf-out"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "hf-out/README.md").read_text()
    assert "| mlm_loss | 3.2500 |" in card and "| examples | 99 |" in card and "| baseline_mlm_loss | 3.6100 |" in card
    hf = AutoModel.from_pretrained(tmp_path / "hf-out", trust_remote_code=True).eval()
    ids, segments = minibert_ids("a crane is flying", None)
    with torch.no_grad():
        got = hf(torch.tensor([ids]), token_type_ids=torch.tensor([segments])).last_hidden_state
        want = bert.encode(torch.tensor([ids]), torch.tensor([segments]), torch.tensor([len(ids)]))
    assert (got - want).abs().max().item() < TOL
    bad = CliRunner().invoke(app, ["export", "hf", "x", "--checkpoint", "nowhere"])
    assert bad.exit_code == 1 and "nowhere/bert.json: missing" in bad.output and not (tmp_path / "x").exists()
