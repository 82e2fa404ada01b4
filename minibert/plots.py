"""Pictures the stages make: loss curves and the probe similarity heatmap (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from minibert.artifacts import atomic_path


def _pyplot():
    """matplotlib, imported on first use: the pretrain stage draws only after training, and importing
    it up front would add its ~27 MB to the training peak RSS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)


def loss_curves(history: Sequence[dict], path: Path, title: str = "minibert pretraining") -> None:
    """MLM and NSP loss against step, side by side (their scales differ ~10x)."""
    steps = [r["step"] for r in history]
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.2))
    for ax, key, color in ((axes[0], "mlm_loss", "tab:blue"), (axes[1], "nsp_loss", "tab:orange")):
        ax.plot(steps, [r[key] for r in history], color=color, lw=1.4)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def similarity_heatmap(sim: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """Cosine similarity between token vectors, labelled `probe:token`."""
    n = len(labels)
    fig, ax = _pyplot().subplots(figsize=(1.0 + 0.42 * n, 0.8 + 0.38 * n))
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
