"""minibert.downstream.adapt: the task's texts as paragraphs of sentences, and task-adaptive MLM on a tiny
BERT: it lowers the MLM loss on those texts, and the same seed gives the same weights."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from minibert.config import FinetuneConfig, ModelConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.downstream.adapt import adapt, adaptation_pairs, paragraphs
from minibert.errors import DataError
from minibert.evaluation.heldout import evaluate
from minibert.model.bert import build_model

TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
VOCAB = Vocab(SPECIALS + (".",) + tuple(f"w{i}" for i in range(31)))


def test_paragraphs_hand_case():
    got = paragraphs(["A b. C's d.", "One sentence only.", "X y. Z", "no full stop at all"])
    assert got == [[["a", "b", "."], ["c", "'s", "d", "."]], [["x", "y", "."], ["z"]]]
    with pytest.raises(DataError, match="adapt_steps: 0"):
        adaptation_pairs(["One sentence only."], VOCAB, 13, seed=0)


def texts(n: int, seed: int) -> list[str]:
    """Articles of 3 to 5 sentences; each sentence a run of consecutive words w(k) w(k+1) w(k+2) from a
    random start, so the words are predictable from their neighbours."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sents = []
        for _ in range(rng.integers(3, 6)):
            k = rng.integers(0, 27)
            sents.append(" ".join(f"w{k + j}" for j in range(rng.integers(2, 5))) + ".")
        out.append(" ".join(sents))
    return out


def test_adapt_lowers_mlm_loss_and_repeats():
    docs = texts(37, 13)
    cfg = FinetuneConfig(adapt_steps=40, adapt_lr=3e-3, split_seed=7)
    pairs = adaptation_pairs(docs, VOCAB, TINY.max_len, seed=99)  # other masks than adapt's own draw
    base = build_model(TINY, len(VOCAB), seed=1)
    before = evaluate(base, pairs, 64, progress=False)["mlm_loss"]
    a = adapt(copy.deepcopy(base), docs, VOCAB, cfg, log=lambda _: None)
    after = evaluate(a, pairs, 64, progress=False)["mlm_loss"]
    assert after < before - 0.3, (before, after)
    b = adapt(copy.deepcopy(base), docs, VOCAB, cfg, log=lambda _: None)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = adapt(copy.deepcopy(base), docs, VOCAB, FinetuneConfig(adapt_steps=40, adapt_lr=3e-3, split_seed=8),
              log=lambda _: None)
    assert not torch.equal(c.state_dict()["token_embedding.weight"], a.state_dict()["token_embedding.weight"])
