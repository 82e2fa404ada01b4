"""Which labelled examples each fine-tuning sees: the dev split carved from the training split, and
class-stratified subsets of the rest for the label-efficiency curve. Pure index arithmetic on label ids,
every draw from a generator seeded by the caller."""
from __future__ import annotations

import numpy as np


def stratified(labels: np.ndarray, per_class: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """Sorted indices holding `per_class[c]` examples of each class c, drawn without replacement."""
    picked = []
    for c, k in sorted(per_class.items()):
        members = np.flatnonzero(labels == c)
        if k > len(members):
            raise ValueError(f"class {c}: {k} examples asked, {len(members)} available")
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def carve_dev(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, dev indices): `share` of each class (rounded, at least one, never all) held out
    as the dev split early stopping reads, so the test split is touched once, at the end."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = {int(c): min(max(1, round(share * n)), n - 1) for c, n in zip(classes, counts)}
    dev = stratified(labels, per_class, np.random.default_rng(seed))
    return np.setdiff1d(np.arange(len(labels)), dev), dev


def subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class (0 or more than a class has: all of it)."""
    classes, counts = np.unique(labels, return_counts=True)
    if per_class == 0 or per_class >= counts.max():
        return np.arange(len(labels))
    return stratified(labels, {int(c): min(per_class, int(n)) for c, n in zip(classes, counts)},
                      np.random.default_rng(seed))
