"""Dynamic MLM masks: every training step redraws its batch's masks, deterministically from (seed, step).

The pairs stage writes each pair once, with one static mask (the book). With `train.masking: dynamic`
the loop takes those same pairs, restores the original tokens (each real slot's label is the token
that stood there) and draws fresh positions and corruptions at `train.mask_rate` with the pairs
stage's own rule (`minibert.data.pairs.mask_tokens`: 80 % `<mask>`, 10 % kept, 10 % a random ordinary
word; never `<cls>`, `<sep>` or `<pad>`). The generator is seeded from (seed, step) alone, and the
masks are drawn for the whole global batch before it is cut among ranks, so a resumed run and a run
on any number of processes see the same masks. The pairs files and held-out scoring are untouched.
"""
from __future__ import annotations

import numpy as np

from minibert.data.pairs import mask_tokens

MASK_STREAM = 0x6D61736B  # "mask": keeps these draws apart from the batch order's (seed, epoch) stream


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of one step's masks: a function of (seed, step) only."""
    return np.random.default_rng([seed, step, MASK_STREAM])


def original_tokens(token_ids: np.ndarray, pred_positions: np.ndarray, mlm_weights: np.ndarray,
                    mlm_labels: np.ndarray) -> np.ndarray:
    """The uncorrupted sequences: each real slot's label written back at its position. (N, T)."""
    tokens = np.array(token_ids, copy=True)
    real = mlm_weights > 0                                             # (N, P)
    rows = np.broadcast_to(np.arange(len(tokens))[:, None], real.shape)
    tokens[rows[real], pred_positions[real]] = mlm_labels[real]
    return tokens


def candidates(segments: np.ndarray, valid_lens: np.ndarray) -> np.ndarray:
    """(N, T) True at the words of `<cls> a <sep> b <sep>`, from the layout alone: not position 0, not
    the first `<sep>` (the last segment-0 position), not the last real position, nothing past it."""
    n, t = segments.shape
    col = np.arange(t)[None, :]                                        # (1, T)
    real = col < valid_lens[:, None]                                   # (N, T)
    first_sep = ((segments == 0) & real).sum(1) - 1                    # (N,)
    return real & (col > 0) & (col < valid_lens[:, None] - 1) & (col != first_sep[:, None])


def redraw(batch: dict[str, np.ndarray], mask_rate: float, vocab_size: int,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`batch` (pair arrays of the pairs files' layout) with fresh masks at `mask_rate`: token_ids,
    pred_positions, mlm_weights and mlm_labels replaced (the slot arrays are round(mask_rate * T) wide);
    segments, valid_lens and nsp_labels as given."""
    valid_lens = np.asarray(batch["valid_lens"]).astype(np.int64)
    tokens = original_tokens(batch["token_ids"], batch["pred_positions"], batch["mlm_weights"],
                             batch["mlm_labels"])
    t = tokens.shape[1]
    corrupted, positions, weights, labels = mask_tokens(
        tokens, valid_lens, candidates(batch["segments"], valid_lens), mask_rate,
        max(1, round(mask_rate * t)), vocab_size, rng)
    return {**batch, "token_ids": corrupted.astype(np.int32), "pred_positions": positions,
            "mlm_weights": weights, "mlm_labels": labels}
