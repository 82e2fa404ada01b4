"""minibert.downstream.stopping: the fine-tuning rate schedule and the early stopping's choice of epoch,
on hand-worked values; and, through `classify.fit`, that the weights left in the model are the best
epoch's."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from minibert.data.vocab import CLS, PAD, SEP, SPECIALS
from minibert.downstream.classify import Recipe, fit
from minibert.downstream.controls import BagOfWords
from minibert.downstream.stopping import EarlyStopping, lr_factor


def test_lr_factor_hand_values():
    # total 10 steps, warmup 4: 1/4, 2/4, 3/4, 4/4 rising, then (10 - step) / 6 down to 0 at step 10
    assert [lr_factor(s, 10, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [lr_factor(s, 10, 4) for s in (4, 7, 9, 10, 13)] == pytest.approx([1.0, 0.5, 1 / 6, 0.0, 0.0])
    # no warmup: 1 at step 0, linear to 0 at total 7
    assert [lr_factor(s, 7, 0) for s in (0, 1, 6, 7)] == pytest.approx([1.0, 6 / 7, 1 / 7, 0.0])


# (dev accuracy, -dev loss) per epoch 1..7. Epoch 3 equals epoch 2's accuracy with a better second key;
# epoch 4 ties epoch 3 on both keys (not better: the earlier stays); epoch 5 is worse; epoch 6 has the
# best accuracy of the first six.
CURVE = [(0.5, -1.0), (0.7, -0.4), (0.7, -0.3), (0.7, -0.3), (0.6, -0.2), (0.9, -0.9), (0.8, 0.0)]


def replay(patience: int) -> tuple[EarlyStopping, list[int], int]:
    """Feed CURVE; -> (the stopper, the epochs whose snapshot was taken, the epoch it stopped at)."""
    stopper, taken = EarlyStopping(patience), []
    for epoch, (score, tie) in enumerate(CURVE, 1):
        if stopper.update(epoch, score, tie, lambda e=epoch: taken.append(e) or f"state {e}"):
            return stopper, taken, epoch
    return stopper, taken, len(CURVE)


def test_early_stopping_hand_curve():
    stopper, taken, stopped = replay(patience=2)
    # best so far: 1, 2, 3 (tie on accuracy, better loss), 3 (full tie keeps 3), 3, -> stop at 3 + 2 = 5
    assert (stopper.best_epoch, stopped, taken, stopper.best_state) == (3, 5, [1, 2, 3], "state 3")
    assert stopper.best_score == 0.7
    stopper, taken, stopped = replay(patience=3)  # epoch 6 comes in time; 7 is worse; the curve ends
    assert (stopper.best_epoch, stopped, taken, stopper.best_state) == (6, 7, [1, 2, 3, 6], "state 6")
    with pytest.raises(ValueError, match="patience 0"):
        EarlyStopping(0)


def test_fit_restores_the_best_epochs_weights():
    """Bag-of-words on a separable task whose dev split carries the *opposite* labels: dev accuracy falls as
    training goes on, so the best epoch is early and the last is not it. The model after `fit` must hold
    exactly the weights it had at the end of the best epoch (copied in `on_epoch`), where the best is
    chosen by hand from the recorded rows: highest dev accuracy, then lowest dev loss, earliest first."""
    S, rng = len(SPECIALS), np.random.default_rng(13)
    y = rng.integers(0, 2, 37)
    tokens = np.full((37, 7), PAD)
    for i, c in enumerate(y):
        n = rng.integers(1, 5)
        tokens[i, :n + 2] = [CLS, *(S + 7 * c + rng.integers(0, 7, n)), SEP]
    data = {"tokens": tokens, "segments": np.zeros_like(tokens), "valid_lens": (tokens != PAD).sum(1)}
    model = BagOfWords(S + 14, 2)
    with torch.no_grad():  # a start that gets the dev split half right, so the best is not trivially epoch 1
        model.weights.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
    rows, states = [], {}

    def on_epoch(row):
        rows.append(row)
        states[row["epoch"]] = copy.deepcopy(model.state_dict())

    recipe = Recipe(lr=0.05, epochs=9, patience=2, warmup_share=0.0, batch_size=7)
    info = fit(model, data, y.astype(np.int64), data, (1 - y).astype(np.int64), recipe, seed=3, on_epoch=on_epoch)
    best = max(rows, key=lambda r: (r["dev_accuracy"], -r["dev_loss"], -r["epoch"]))["epoch"]
    assert info["best_epoch"] == best and info["epochs_run"] == len(rows) == min(9, best + 2)
    assert best < len(rows)  # restoring matters: the last epoch's weights are other than the best's
    assert not all(torch.equal(states[len(rows)][k], states[best][k]) for k in states[best])
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[best][k]), k
    assert info["best_dev_accuracy"] == rows[best - 1]["dev_accuracy"]
