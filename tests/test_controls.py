"""The controls beside every fine-tuning figure: the majority class and the bag-of-words classifier."""
from __future__ import annotations

import numpy as np
import torch

from minibert.data.vocab import CLS, PAD, SEP, SPECIALS
from minibert.downstream.classify import Recipe, fit
from minibert.downstream.controls import BagOfWords, majority


def test_majority_and_its_tie():
    assert majority(np.array([2, 0, 2, 1, 2]), 4).tolist() == [2, 2, 2, 2]
    assert majority(np.array([3, 1, 1, 3]), 2).tolist() == [1, 1]  # a tie: the smaller class id


def test_bag_of_words_is_a_linear_map_of_term_frequencies():
    V, C, S = 37, 7, len(SPECIALS)
    rng = np.random.default_rng(13)
    model = BagOfWords(V, C)
    W, b = rng.normal(size=(V, C)), rng.normal(size=C)
    with torch.no_grad():
        model.weights.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    rows = [[CLS, S, S + 1, S, SEP, PAD], [CLS, S + 5, SEP, S + 9, S + 9, SEP], [CLS, SEP, PAD, PAD, PAD, PAD]]
    tokens = torch.tensor(rows)
    got = model(tokens, torch.zeros_like(tokens), torch.tensor([5, 6, 2])).detach().numpy()
    for i, row in enumerate(rows):
        words = [t for t in row if t >= S]
        tf = np.bincount(words, minlength=V) / len(words) if words else np.eye(V)[CLS]  # no word: the <cls> row
        np.testing.assert_allclose(got[i], tf @ W + b, rtol=1e-5, atol=1e-6)


def test_bag_of_words_learns_disjoint_vocabularies():
    S = len(SPECIALS)
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 99)
    tokens = np.full((99, 9), PAD)
    for i, c in enumerate(y):  # class c writes words S + 10c ... S + 10c + 9
        n = rng.integers(1, 8)
        tokens[i, :n + 2] = [CLS, *(S + 10 * c + rng.integers(0, 10, n)), SEP]
    data = {"tokens": tokens, "segments": np.zeros_like(tokens), "valid_lens": (tokens != PAD).sum(1)}
    model = BagOfWords(S + 30, 3)
    rows = []
    fit(model, data, y.astype(np.int64), data, y.astype(np.int64),
        Recipe(lr=0.05, epochs=20, patience=20, warmup_share=0.0, batch_size=13), seed=0, on_epoch=rows.append)
    losses = [r["train_loss"] for r in rows]
    pred = model(*(torch.from_numpy(data[k]) for k in ("tokens", "segments", "valid_lens"))).argmax(-1).numpy()
    assert losses[-1] < losses[0] / 4 and (pred == y).all()
