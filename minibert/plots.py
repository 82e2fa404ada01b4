"""Pictures the stages make: loss curves and the probe similarity heatmap (PNG, matplotlib Agg).

The loss plots of different runs are meant to be set side by side: each names its run and recipe in
the title, and the axes are fixed by the task, not the data — MLM loss 0..ln(vocabulary size) (a
uniform guess), NSP 0..ln 2 (a coin) plus a margin, steps 0..max_steps. `*_figure` build the
matplotlib figure (tests read its axes); the other helpers save it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from minibert.artifacts import atomic_path

NSP_TOP = 1.25 * math.log(2)  # NSP loss hovers around ln 2 early on: a margin above it keeps the curve visible


def _pyplot():
    """matplotlib, imported on first use: the pretrain stage draws only after training, and importing
    it up front would add its ~27 MB to the training peak RSS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:  # a full disk: WriteError, no partial PNG
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    finally:
        _pyplot().close(fig)


def run_title(run_name: str | None, model: dict, train: dict) -> str:
    """Two lines: the run's name, then the recipe values a comparison turns on."""
    recipe = (f"{model['num_layers']} layers x {model['hidden']}, {model['norm']}-LN, dropout {model['dropout']} | "
              f"lr {train['lr']:g} {train['schedule']}, batch {train['batch_size']}, "
              f"{train['max_steps']} steps, seed {train['seed']}")
    return f"{run_name or 'minibert pretraining'}\n{recipe}"


def loss_figure(history: Sequence[dict], title: str, vocab_size: int, max_steps: int):
    """MLM and NSP loss against step, side by side (their scales differ ~10x), on fixed axes; the
    held-out figures (`valid_mlm_loss`, `valid_nsp_loss` in some rows) as markers on the same panels."""
    steps = [r["step"] for r in history]
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.4))
    panels = ((axes[0], "mlm_loss", "tab:blue", math.log(vocab_size), "MLM loss (real masked slots)"),
              (axes[1], "nsp_loss", "tab:orange", math.log(2), "NSP loss"))
    for ax, key, color, chance, label in panels:
        ax.plot(steps, [r[key] for r in history], color=color, lw=1.4, label="train")
        held = [r for r in history if f"valid_{key}" in r]
        if held:
            ax.plot([r["step"] for r in held], [r[f"valid_{key}"] for r in held], color="black", lw=1.0,
                    marker="o", ms=3.5, label="held-out")
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="uniform guess")
        ax.set_xlim(0, max_steps)
        ax.set_ylim(0, NSP_TOP if key == "nsp_loss" else 1.05 * chance)  # 1.05: an untrained model sits at ln V
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def loss_curves(history: Sequence[dict], path: Path, title: str = "minibert pretraining", *,
                vocab_size: int, max_steps: int) -> None:
    _save(loss_figure(history, title, vocab_size, max_steps), path)


def similarity_limits(sim: np.ndarray) -> tuple[float, float]:
    """Colour range of a cosine-similarity matrix: its off-diagonal values (the diagonal is 1 by
    definition and would otherwise pin the top), padded when they are all equal."""
    off = sim[~np.eye(len(sim), dtype=bool)] if len(sim) > 1 else sim.ravel()
    lo, hi = float(off.min()), float(off.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    return lo, hi


def similarity_figure(sim: np.ndarray, labels: Sequence[str], title: str):
    """Cosine similarity between token vectors, labelled `probe:token`; the colour scale spans the
    data (contextual vectors of a small BERT are all alike: on a fixed -1..1 scale they were one colour)."""
    n = len(labels)
    fig, ax = _pyplot().subplots(figsize=(1.0 + 0.42 * n, 0.8 + 0.38 * n))
    lo, hi = similarity_limits(sim)
    im = ax.imshow(sim, vmin=lo, vmax=hi, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity (scale: off-diagonal range)")
    ax.set_title(title, fontsize=10)
    return fig


def similarity_heatmap(sim: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    _save(similarity_figure(sim, labels, title), path)


def confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Counts with true classes as rows and predicted as columns, each cell written in."""
    n = len(classes)
    fig, ax = _pyplot().subplots(figsize=(1.6 + 0.7 * n, 1.2 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > confusion.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
