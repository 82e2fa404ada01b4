"""The fine-tuning classifier: the book's input layout, <unk> rows, what learns when frozen, the scores,
repeatable training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from minibert.config import ModelConfig
from minibert.data.vocab import CLS, PAD, SEP, SPECIALS, Vocab, pair_ids
from minibert.downstream import labelled
from minibert.downstream.classify import Classifier, encode_table, predict, scores, train
from minibert.errors import DataError
from minibert.model.bert import build_model

TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
WORDS = tuple(f"w{i}" for i in range(37))


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(SPECIALS + WORDS)


def test_pair_layout_hand_case():
    ids, segs = pair_ids([10, 11, 12], [20, 21], max_len=7)  # room for 4 words: the longer side loses one
    assert ids == [CLS, 10, 11, SEP, 20, 21, SEP] and segs == [0, 0, 0, 0, 1, 1, 1]
    ids, segs = pair_ids([10, 11, 12], None, max_len=4)
    assert ids == [CLS, 10, 11, SEP] and segs == [0, 0, 0, 0]
    # a tie trims the second text first, as the book's _truncate_pair_of_tokens does
    assert pair_ids([1, 2], [3, 4], max_len=6)[0] == [CLS, 1, 2, SEP, 3, SEP]
    assert pair_ids([1, 2], [3, 4], max_len=7)[0] == [CLS, 1, 2, SEP, 3, 4, SEP]  # fits: untouched


def test_encode_table_pads_and_lowercases(vocab):
    df = labelled.table([("W1 w2", None, "x", "f:1"), ("w3", "w4 W5, w6", "y", "f:2")])
    data = encode_table(df, vocab, max_len=7)
    v = vocab.id
    assert data["tokens"].shape == (2, 7) and data["valid_lens"].tolist() == [4, 7]
    assert data["tokens"][0].tolist() == [CLS, v("w1"), v("w2"), SEP, PAD, PAD, PAD]
    # "w5," splits its comma off (an unknown word here): <cls> w3 <sep> w4 w5 , <sep> with w6 trimmed
    assert data["tokens"][1].tolist()[:4] == [CLS, v("w3"), SEP, v("w4")]
    assert data["segments"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_a_text_of_only_unknown_words_is_one_line(vocab):
    df = labelled.table([("w1", None, "x", "mine.tsv:2"), ("zebra quokka", None, "y", "mine.tsv:3")])
    with pytest.raises(DataError) as e:
        encode_table(df, vocab, max_len=9)
    assert str(e.value).startswith("mine.tsv:3: ") and "all <unk>" in str(e.value) and "\n" not in str(e.value)
    pair = labelled.table([("w1", "zebra", "x", "snli:7")])
    with pytest.raises(DataError, match="^snli:7: "):
        encode_table(pair, vocab, max_len=9)


def _toy(vocab, n=99, seed=0):
    """Two classes told apart by their words: class 0 uses w0-w9, class 1 w20-w29."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    rows = [(" ".join(f"w{rng.integers(0, 10) + 20 * c}" for _ in range(rng.integers(2, 6))), None, str(c), f"t:{i}")
            for i, c in enumerate(y)]
    return encode_table(labelled.table(rows), vocab, TINY.max_len), y.astype(np.int64)


def test_frozen_encoder_gets_no_gradient_unfrozen_does(vocab):
    data, y = _toy(vocab, n=13)
    for freeze in (True, False):
        model = Classifier(build_model(TINY, len(vocab), seed=1), 3, freeze=freeze)
        logits = model(*(torch.from_numpy(data[k]) for k in ("tokens", "segments", "valid_lens")))
        assert logits.shape == (13, 3)
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
        grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
        assert grads["output.weight"] and grads["bert.nsp_hidden.0.weight"]  # the <cls> head always learns
        encoder = [g for n, g in grads.items() if "embedding" in n or ".blocks." in n]
        assert len(encoder) >= 3 + 12  # the three embeddings and every block weight
        assert all(encoder) if not freeze else not any(encoder)


def test_scores_match_sklearn():
    rng = np.random.default_rng(7)
    y_true, y_pred = rng.integers(0, 5, 99), rng.integers(0, 5, 99)
    y_pred[y_pred == 3] = 2  # class 3 never predicted: its F1 is 0
    s = scores(y_true, y_pred, 5)
    assert s["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=range(5), zero_division=0))
    assert s["confusion"] == confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


def test_training_is_repeatable_and_learns_a_separable_task(vocab):
    data, y = _toy(vocab)

    def fit(seed, global_seed):
        model = Classifier(build_model(TINY, len(vocab), seed=3), 2)
        torch.nn.init.zeros_(model.output.weight)  # the new layer's init is the caller's (run() seeds it)
        torch.nn.init.zeros_(model.output.bias)
        torch.manual_seed(global_seed)  # the global RNG must not matter: train() draws from its own seed
        losses = train(model, data, y, epochs=6, lr=3e-3, batch_size=13, seed=seed)
        return losses, predict(model, data)

    a, b, c = fit(5, 123), fit(5, 321), fit(6, 123)
    assert a[0] == b[0] and (a[1] == b[1]).all()
    assert a[0] != c[0]  # another shuffle and other dropout draws
    assert a[0][-1] < a[0][0] and (a[1] == y).mean() > 0.9  # majority would be ~0.5
