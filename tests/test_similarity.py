"""Word-similarity probes: Spearman's rho against scipy, the judgement files, the score on hand-made vectors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from minibert.config import ModelConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.errors import DataError
from minibert.evaluation.similarity import read_judgements, score, spearman, word_similarity, word_vectors
from minibert.model.bert import build_model


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(13)
    x, y = rng.integers(0, 5, 37).astype(float), rng.normal(size=37)  # x full of ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(y, y * 3 + 1) == pytest.approx(1.0) and spearman(y, -y) == pytest.approx(-1.0)
    assert spearman(np.ones(7), y[:7]) == 0.0  # no variation: no correlation


def test_read_judgements_and_a_bad_line(tmp_path):
    p = tmp_path / "sim.txt"
    p.write_text("# comment\nOld\tNew\t1.58\nsmart\tintelligent\t9.2\n")
    df = read_judgements(p)
    assert df.to_dict("list") == {"word1": ["old", "smart"], "word2": ["new", "intelligent"], "human": [1.58, 9.2]}
    p.write_text("old\tnew\t1.58\nold new 3\n")
    with pytest.raises(DataError, match="sim.txt:2: expected"):
        read_judgements(p)
    p.write_text("# only comments\n")
    with pytest.raises(DataError, match="no word pairs"):
        read_judgements(p)


def test_score_on_hand_made_embeddings():
    """Words on a circle: the cosine of two words falls with their angle, so a 'human' score that falls
    with the angle correlates at exactly 1 and one that rises at exactly -1; out-of-vocabulary pairs drop."""
    words = [f"w{i}" for i in range(7)]
    vocab = Vocab(SPECIALS + tuple(words))
    model = build_model(ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, max_len=13), len(vocab), seed=0)
    angles = np.linspace(0, np.pi * 0.9, 7)
    with torch.no_grad():
        emb = model.token_embedding.weight
        emb.zero_()
        for i, a in enumerate(angles):
            emb[vocab.id(words[i]), 0], emb[vocab.id(words[i]), 1] = float(np.cos(a)), float(np.sin(a))
    pairs = pd.DataFrame([("w0", f"w{j}", 10.0 - j) for j in range(1, 7)] + [("w0", "zebra", 5.0)],
                         columns=["word1", "word2", "human"])
    s = score(model, vocab, pairs)
    assert s["pairs"] == 6 and s["total"] == 7
    assert s["spearman_embedding"] == pytest.approx(1.0)
    assert -1.0 <= s["spearman_context"] <= 1.0
    pairs["human"] = -pairs["human"]
    assert score(model, vocab, pairs)["spearman_embedding"] == pytest.approx(-1.0)
    assert "spearman_embedding" not in score(model, vocab, pairs.iloc[:2])  # under 3 pairs: no figure


def test_real_judgement_files(task_data):
    vocab = Vocab(SPECIALS + ("old", "new", "smart", "intelligent", "hard", "difficult", "happy", "cheerful", "car",
                              "automobile", "tiger", "cat"))
    model = build_model(ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, max_len=13), len(vocab), seed=0)
    out = word_similarity(model, model, vocab, ("simlex999", "wordsim353"), env={"MINIBERT_TASK_DATA": str(task_data)})
    assert out["simlex999"]["trained"]["total"] == 999 and out["wordsim353"]["trained"]["total"] == 353
    assert out["simlex999"]["trained"] == out["simlex999"]["untrained"]  # the same model scores the same


def test_context_vectors_are_the_words_own_position():
    """Reference by hand: each word alone as `<cls> w <sep>` (one sequence, segment 0, no padding) through
    `bert.encode` in eval mode; its context vector is row 1 (the word), not row 0 (`<cls>`) or 2 (`<sep>`)."""
    from minibert.data.vocab import CLS, SEP

    words = ["w3", "w0", "w5", "w1"]
    vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(6)))
    model = build_model(ModelConfig(num_layers=2, hidden=12, heads=3, ffn_hidden=37, max_len=13), len(vocab), seed=3)
    got = word_vectors(model, vocab, words)
    assert model.training  # handed back in the mode it came in
    model.eval()
    with torch.no_grad():
        for i, w in enumerate(words):
            tokens = torch.tensor([[CLS, vocab.id(w), SEP]])
            rows = model.encode(tokens, torch.zeros_like(tokens), torch.tensor([3]))[0].double().numpy()  # (3, H)
            np.testing.assert_allclose(got["context"][i], rows[1], rtol=1e-4, atol=1e-5)
            assert np.abs(rows[0] - rows[1]).max() > 1e-3  # <cls>'s row is another vector: the check can tell
            np.testing.assert_array_equal(got["embedding"][i], model.token_embedding.weight[vocab.id(w)].double().numpy())
