"""minibert.downstream.selection: the dev split carved from the training split (stratified, disjoint from
the test split and from what is trained on) and the class-stratified label subsets, counted by hand."""
from __future__ import annotations

import numpy as np
import pytest

from minibert.config import FinetuneConfig
from minibert.downstream import labelled
from minibert.downstream.finetune import load_task
from minibert.downstream.selection import carve_dev, stratified, subset

# class 0: 13 examples, class 1: 7, class 2: 5, class 3: 2, interleaved
LABELS = np.array([0] * 13 + [1] * 7 + [2] * 5 + [3] * 2)[np.random.default_rng(99).permutation(27)]


def per_class(labels: np.ndarray, idx: np.ndarray) -> list[int]:
    return np.bincount(labels[idx], minlength=4).tolist()


def test_stratified_exact_counts_without_replacement():
    idx = stratified(LABELS, {0: 4, 2: 5, 3: 1}, np.random.default_rng(1))
    assert per_class(LABELS, idx) == [4, 0, 5, 1] and len(set(idx)) == 10 and list(idx) == sorted(idx)
    with pytest.raises(ValueError, match="class 1: 8 examples asked, 7 available"):
        stratified(LABELS, {1: 8}, np.random.default_rng(1))


def test_subset_counts_determinism_and_zero_is_all():
    a = subset(LABELS, 3, seed=5)
    assert per_class(LABELS, a) == [3, 3, 3, 2]  # class 3 has only 2: all of it
    assert (subset(LABELS, 3, seed=5) == a).all()  # same seed, same examples
    assert any(not np.array_equal(subset(LABELS, 3, seed=s), a) for s in (6, 7))  # another seed, others
    assert per_class(LABELS, subset(LABELS, 6, seed=0)) == [6, 6, 5, 2]
    assert subset(LABELS, 0, seed=5).tolist() == list(range(27))
    assert subset(LABELS, 13, seed=5).tolist() == list(range(27))  # as many as the largest class: all


def test_carve_dev_is_stratified_disjoint_and_complete():
    # share 0.2: class 0 round(2.6) = 3, class 1 round(1.4) = 1, class 2 round(1.0) = 1, class 3 round(0.4) -> 1
    train, dev = carve_dev(LABELS, 0.2, seed=3)
    assert per_class(LABELS, dev) == [3, 1, 1, 1] and per_class(LABELS, train) == [10, 6, 4, 1]
    assert not set(train) & set(dev) and sorted([*train, *dev]) == list(range(27))
    # share 0.5: class 3 (2 examples) gives 1 — never all of a class, so every class is still trained on
    assert per_class(LABELS, carve_dev(LABELS, 0.5, seed=3)[1]) == [6, 4, 2, 1]  # round(6.5)=6, 3.5->4, 2.5->2
    assert (carve_dev(LABELS, 0.2, seed=3)[1] == dev).all()


def test_dev_never_overlaps_test_nor_training(tmp_path):
    """The real path: a `task: file` TSV split into train/test by `load_task`, then the dev split carved
    from the training rows; rows are told apart by their unique text."""
    rng = np.random.default_rng(37)
    rows = [f"w{i} w{rng.integers(0, 37)}\t\t{'abc'[i % 3]}" for i in range(99)]
    (tmp_path / "mine.tsv").write_text("text\ttext_b\tlabel\n" + "\n".join(rows) + "\n")
    cfg = FinetuneConfig(task="file", train_file=str(tmp_path / "mine.tsv"), test_share=0.2, split_seed=7,
                         dev_share=0.13)
    train_df, test_df, origin = load_task(cfg)
    _, y, _ = labelled.label_ids(train_df, test_df, origin)
    train_idx, dev_idx = carve_dev(y, cfg.dev_share, cfg.split_seed)
    texts = lambda df, idx=None: set(df["text"] if idx is None else df["text"].iloc[idx])  # noqa: E731
    assert len(test_df) == 20 and len(train_df) == 79 and len(texts(train_df)) == 79
    dev, train, test = texts(train_df, dev_idx), texts(train_df, train_idx), texts(test_df)
    assert not dev & test and not dev & train and not train & test
    assert len(dev) + len(train) + len(test) == 99
    counts = np.bincount(y, minlength=3)
    assert np.bincount(y[dev_idx], minlength=3).tolist() == [max(1, round(0.13 * n)) for n in counts]
