"""The fine-tuning classifier: the book's input layout, clitics, <unk> rows, what learns when frozen, the
pooling over real tokens, the scores, the epoch's loss and rate, repeatable training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from minibert.config import ModelConfig
from minibert.data.vocab import CLS, PAD, SEP, SPECIALS, UNK, Vocab, pair_ids
from minibert.downstream import labelled
from minibert.downstream.classify import Classifier, Recipe, encode_table, epoch_batches, fit, logits, mean_pool, predict, scores
from minibert.downstream.controls import BagOfWords
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
    dev, y_dev = _toy(vocab, n=13, seed=1)

    def train(seed, global_seed):
        model = Classifier(build_model(TINY, len(vocab), seed=3), 2)
        torch.nn.init.zeros_(model.output.weight)  # the new layer's init is the caller's (run() seeds it)
        torch.nn.init.zeros_(model.output.bias)
        torch.manual_seed(global_seed)  # the global RNG must not matter: fit() draws from its own seed
        rows = []
        fit(model, data, y, dev, y_dev, Recipe(lr=3e-3, epochs=12, patience=12, warmup_share=0.0, batch_size=13),
            seed=seed, on_epoch=rows.append)
        return [r["train_loss"] for r in rows], predict(model, data)

    a, b, c = train(5, 123), train(5, 321), train(6, 123)
    assert a[0] == b[0] and (a[1] == b[1]).all()
    assert a[0] != c[0]  # another shuffle and other dropout draws
    assert a[0][-1] < a[0][0] and (a[1] == y).mean() > 0.9  # majority would be ~0.5


def test_encode_table_splits_clitics_as_wikitext_does():
    voc = Vocab(SPECIALS + ("do", "n't", "john", "'s", "ca"))
    df = labelled.table([("Don't John\u2019s", None, "x", "f:1"), ("can't", None, "y", "f:2")])
    v = voc.id
    split = encode_table(df, voc, max_len=7)
    assert split["tokens"][0].tolist() == [CLS, v("do"), v("n't"), v("john"), v("'s"), SEP, PAD]
    assert split["tokens"][1].tolist()[:4] == [CLS, v("ca"), v("n't"), SEP]
    # without the split "don't" is one word, unknown to this vocabulary (a text of unknowns alone is an error)
    whole = encode_table(labelled.table([("Don't do", None, "x", "f:3")]), voc, max_len=7, clitics=False)
    assert whole["tokens"][0].tolist()[:4] == [CLS, UNK, v("do"), SEP]


def test_mean_pool_hand_case():
    enc = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                        [[0.0, 6.0], [3.0, 0.0], [6.0, 3.0]]])  # row 0's third vector is padding
    got = mean_pool(enc, torch.tensor([2, 3]))
    assert got.tolist() == [[2.0, 3.0], [3.0, 3.0]]


@pytest.mark.parametrize("pooling", ["mean", "both"])
def test_padding_does_not_move_the_pooled_classifier(vocab, pooling):
    """The same inputs with 4 more padding columns, and with other ids in the padded slots: the logits are
    the same (eval mode); a change of a real token does move them (the check can see a change)."""
    data, _ = _toy(vocab, n=13)
    model = Classifier(build_model(TINY, len(vocab), seed=1), 3, pooling=pooling).eval()
    T = int(data["valid_lens"].max())
    base = {k: v[:, :T] if v.ndim == 2 else v for k, v in data.items()}
    wide = {k: np.pad(v, ((0, 0), (0, 4)), constant_values=PAD) if v.ndim == 2 else v for k, v in base.items()}
    assert wide["tokens"].shape[1] <= TINY.max_len
    junk = {**wide, "tokens": wide["tokens"].copy()}
    pad = np.arange(junk["tokens"].shape[1])[None] >= junk["valid_lens"][:, None]
    junk["tokens"][pad] = len(SPECIALS) + 7  # a real word's id where padding was
    run = lambda d: model(*(torch.from_numpy(d[k]) for k in ("tokens", "segments", "valid_lens"))).detach()  # noqa: E731
    ref = run(base)
    torch.testing.assert_close(run(wide), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(junk), ref, rtol=1e-5, atol=1e-6)
    moved = {**base, "tokens": base["tokens"].copy()}
    moved["tokens"][:, 1] = len(SPECIALS) + 30
    assert not torch.allclose(run(moved), ref, atol=1e-4)


def test_macro_f1_counts_a_class_never_present_nor_predicted_as_zero():
    # true 0 0 1 1 1, predicted 0 1 1 1 0, three classes: class 2 is never there.
    # F1(0) = 2*1 / (2 predicted + 2 true) = 1/2, F1(1) = 2*2 / (3 + 3) = 2/3, F1(2) = 0 -> (1/2 + 2/3 + 0) / 3
    s = scores(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert s["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 3) and s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_epoch_batches_cycle_a_small_set_to_fill_an_epoch():
    recipe = Recipe(lr=1.0, epochs=1, patience=1, warmup_share=0.0, batch_size=5, min_epoch_examples=20)
    got = epoch_batches(13, recipe, np.random.default_rng(0))  # ceil(20 / 13) = 2 passes: 26 = 5 * 5 + 1
    assert [len(b) for b in got] == [5, 5, 5, 5, 5, 1]
    flat = np.concatenate(got)
    assert sorted(flat[:13]) == list(range(13)) and sorted(flat[13:]) == list(range(13))  # whole passes
    plain = epoch_batches(13, Recipe(1.0, 1, 1, 0.0, 5), np.random.default_rng(0))
    assert [len(b) for b in plain] == [5, 5, 3]


def test_epoch_loss_is_the_example_mean_and_the_rate_follows_the_schedule():
    """13 examples in batches of 5, 5, 3 with a rate so small that the model does not move: the epoch's
    train_loss must be the mean of the 13 per-example losses (computed before training, plainly), not
    the mean of the three batch means. The rate logged at each epoch's end: 3 steps an epoch, 3 epochs,
    warmup round(0.34 * 9) = 3 steps -> factors 3/3, (9 - 5) / 6, (9 - 8) / 6 at steps 2, 5, 8."""
    S, rng = len(SPECIALS), np.random.default_rng(13)
    y = rng.integers(0, 3, 13).astype(np.int64)
    tokens = np.full((13, 7), PAD)
    for i in range(13):
        n = rng.integers(1, 6)
        tokens[i, :n + 2] = [CLS, *(S + rng.integers(0, 30, n)), SEP]
    data = {"tokens": tokens, "segments": np.zeros_like(tokens), "valid_lens": (tokens != PAD).sum(1)}
    model = BagOfWords(S + 30, 3)
    with torch.no_grad():
        model.weights.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(5))
    per_example = torch.nn.functional.cross_entropy(logits(model, data), torch.from_numpy(y), reduction="none")
    rows = []
    lr = 1e-30
    fit(model, data, y, data, y, Recipe(lr=lr, epochs=3, patience=3, warmup_share=0.34, batch_size=5), seed=0,
        on_epoch=rows.append)
    want = float(per_example.mean())
    assert [r["train_loss"] for r in rows] == pytest.approx([want] * 3, rel=1e-6)
    order = epoch_batches(13, Recipe(lr, 3, 3, 0.34, 5), np.random.default_rng(0))  # fit's first epoch order
    unweighted = float(np.mean([per_example[b].mean() for b in order]))
    assert abs(unweighted - want) > 1e-3  # the test can tell the two means apart
    assert [r["lr"] / lr for r in rows] == pytest.approx([1.0, 4 / 6, 1 / 6], rel=1e-9)
