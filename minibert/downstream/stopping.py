"""The fine-tuning schedule and its early stopping: small pure pieces the loop in `classify.fit` uses."""
from __future__ import annotations

from typing import Any, Callable


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The rate's multiplier at `step` (0-based): linear from 1/warmup up to 1 over the first `warmup`
    steps, then linear down to 0 at `total` (the BERT paper's fine-tuning schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class EarlyStopping:
    """Keeps the best epoch by (score, tie_break), both higher-is-better, and says when `patience`
    epochs in a row brought no better one. The state is taken (by `snapshot()`) only when it is best."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience {patience}: an integer >= 1")
        self.patience = patience
        self.best_epoch, self.best_score, self.best_key, self.best_state = 0, float("-inf"), None, None

    def update(self, epoch: int, score: float, tie_break: float, snapshot: Callable[[], Any]) -> bool:
        """Record `epoch`; True when training should stop."""
        key = (score, tie_break)
        if self.best_key is None or key > self.best_key:
            self.best_epoch, self.best_score, self.best_key, self.best_state = epoch, score, key, snapshot()
        return epoch - self.best_epoch >= self.patience
