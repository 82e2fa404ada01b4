"""minibert.downstream.finetune.run in this process, on generated labelled tables and a tiny BERT: the
majority control is fitted on the training labels, each system gets its own rate, the dev split is
carved per class, and the label-efficiency rows count the labels each run was given."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from minibert.config import FinetuneConfig, ModelConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.downstream import labelled
from minibert.downstream.finetune import run
from minibert.model.bert import build_model

TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
VOCAB = Vocab(SPECIALS + tuple(f"w{i}" for i in range(37)))
BASE = {"a": 0, "b": 12, "c": 24}  # class x writes words w{BASE[x]} .. w{BASE[x] + 11}


def table(counts: dict[str, int], seed: int):
    rng = np.random.default_rng(seed)
    rows = [(" ".join(f"w{BASE[c] + rng.integers(0, 12)}" for _ in range(rng.integers(2, 6))), None, c, f"t:{c}{i}")
            for c, n in counts.items() for i in range(n)]
    return labelled.table([rows[i] for i in rng.permutation(len(rows))])


def pretrained_factory():
    """A fresh copy of one tiny BERT per call; every copy handed out is kept, to look at after `run`."""
    base, handed = build_model(TINY, len(VOCAB), seed=0), []

    def fresh():
        handed.append(copy.deepcopy(base))
        return handed[-1]
    return base, handed, fresh


def test_majority_is_the_training_majority_not_the_tests():
    """Training: 19 a, 7 b, 5 c; test: 2 a, 9 b, 2 c. The majority control answers `a` on every test row:
    accuracy 2/13 and macro-F1 (2*2 / (13 + 2)) / 3 (F1 of a = 2TP / (predicted + true); b, c: 0).
    Fitted on the test labels it would answer `b`: 9/13."""
    train_df, test_df = table({"a": 19, "b": 7, "c": 5}, 1), table({"a": 2, "b": 9, "c": 2}, 2)
    cfg = FinetuneConfig(task="file", train_file="in-memory.tsv", max_len=13, epochs=1, patience=1, batch_size=13, seeds=(0,),
                         min_epoch_examples=0)
    _, _, fresh = pretrained_factory()
    res = run(cfg, fresh, VOCAB, train_df, test_df, "mine", log=lambda _: None)
    major = res.per_seed.query("system == 'majority'").iloc[0]
    assert major["accuracy"] == pytest.approx(2 / 13) and major["macro_f1"] == pytest.approx((4 / 15) / 3)
    # the dev split: per class max(1, round(0.1 * n)) of 19, 7, 5 = 2, 1, 1 held out of training
    assert res.sizes == {"train": 31 - 4, "dev": 4, "test": 13}


def test_each_system_trains_at_its_own_rate():
    """lr tiny, bow_lr large on a task told apart by disjoint words: bag-of-words must learn it (test
    accuracy 1) while the pretrained BERT that `run` fine-tuned stays at its initial weights. With the two
    rates swapped, bag-of-words would stay at its all-zero start (one class for every row) and BERT move."""
    train_df, test_df = table({"a": 13, "b": 13, "c": 11}, 3), table({"a": 5, "b": 4, "c": 4}, 4)
    cfg = FinetuneConfig(task="file", train_file="in-memory.tsv", max_len=13, epochs=3, patience=3, batch_size=7, seeds=(0,), lr=1e-12,
                         bow_lr=0.5, min_epoch_examples=0)
    base, handed, fresh = pretrained_factory()
    res = run(cfg, fresh, VOCAB, train_df, test_df, "mine", log=lambda _: None)
    bow = res.per_seed.query("system == 'bag_of_words'").iloc[0]
    assert bow["accuracy"] == 1.0
    tuned = handed[1:]  # handed[0] only tells run the model's shape
    assert len(tuned) == 1
    start = base.state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in tuned[0].state_dict().items())
    assert moved < 1e-8  # Adam moves each weight by about lr per step: 3 epochs x 4 steps x 1e-12


def test_label_counts_give_stratified_runs_and_a_curve():
    """label_counts (2, 0): 2 labels per class = 6 training examples (dev: 1 per class), then all of the
    training split; every system and the majority get a row per count, and the curve's rows say so."""
    train_df, test_df = table({"a": 13, "b": 11, "c": 7}, 5), table({"a": 3, "b": 3, "c": 3}, 6)
    cfg = FinetuneConfig(task="file", train_file="in-memory.tsv", max_len=13, epochs=1, patience=1, batch_size=7, seeds=(0, 1),
                         label_counts=(2, 0), min_epoch_examples=0)
    _, _, fresh = pretrained_factory()
    res = run(cfg, fresh, VOCAB, train_df, test_df, "mine", log=lambda _: None)
    dev = sum(max(1, round(0.1 * n)) for n in (13, 11, 7))  # 1 + 1 + 1
    assert res.sizes["dev"] == dev
    examples = res.per_seed.groupby("labels")["train_examples"].unique().to_dict()
    assert {k: v.tolist() for k, v in examples.items()} == {2: [6], 0: [31 - dev]}
    curve = res.label_curve()
    assert len(curve) == 2 * 4 and set(curve.system) == {"pretrained", "random_init", "bag_of_words", "majority"}
    assert (curve.query("labels == 2").train_examples == 6).all()
