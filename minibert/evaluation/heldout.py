"""Held-out metrics: the pretrained model scored on the fixed valid pairs, and what to hold them against.

Losses are sums over every real MLM slot (or every pair) divided by the count, accumulated in
float64, so the figures do not depend on `eval.batch_size` (a mean of batch means would weight a
short last batch like a full one). Accuracy is top-1 over the real masked slots only.

`heldout_hook` is the same scoring on a fixed subset, called by `fit` during training (the held-out
curve); `baselines` are the trivial predictors a model must beat (the most frequent masked word, the
NSP majority class), estimated on the train pairs and scored on the valid ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from minibert.data.batches import gather_batch, to_tensors
from minibert.data.pairs import load_pairs  # noqa: F401 (re-exported: the evaluate stage reads valid pairs)
from minibert.errors import DataError, MinibertError
from minibert.progress import Progress

# The figures the held-out curve logs per step (prefixed `valid_`).
CURVE = ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def evaluate(model: torch.nn.Module, pairs: dict[str, np.ndarray], batch_size: int,
             device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """MLM loss/perplexity/accuracy over real slots and NSP loss/accuracy over pairs, in eval mode."""
    if batch_size < 1:
        raise MinibertError(f"evaluate: batch_size = {batch_size}; use an integer >= 1")
    n = len(pairs["nsp_labels"])
    if n == 0:
        raise DataError("evaluate: the pairs file holds no pairs; check the valid split and pairs.max_len")
    data = to_tensors(pairs, torch.device(device))
    was_training = model.training
    model.eval()  # no dropout: the figures must be deterministic
    mlm_sum = nsp_sum = 0.0
    mlm_hits = nsp_hits = slots = 0
    try:
        with torch.inference_mode(), Progress("evaluate", math.ceil(n / batch_size), "batches",
                                                enabled=progress) as bar:
            for lo in range(0, n, batch_size):
                b = gather_batch(data, np.arange(lo, min(lo + batch_size, n)))
                mlm_logits, nsp_logits = model(b["token_ids"], b["segments"], b["valid_lens"],
                                               b["pred_positions"], b["mlm_weights"])  # (M, V), (b, 2)
                labels = b["mlm_labels"][b["mlm_weights"] > 0].long()  # (M,), forward's slot order
                nsp_labels = b["nsp_labels"].long()  # (b,)
                mlm = F.cross_entropy(mlm_logits.float(), labels, reduction="none")  # (M,)
                nsp = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="none")  # (b,)
                # float64 sums: per-example values are summed in a batch-size independent precision
                mlm_sum += float(mlm.double().sum())
                nsp_sum += float(nsp.double().sum())
                mlm_hits += int((mlm_logits.argmax(-1) == labels).sum())
                nsp_hits += int((nsp_logits.argmax(-1) == nsp_labels).sum())
                slots += int(labels.numel())
                bar.advance()
    finally:
        model.train(was_training)
    mlm_loss = mlm_sum / slots
    return {
        "mlm_loss": mlm_loss,
        "mlm_perplexity": math.exp(mlm_loss),
        "mlm_accuracy": mlm_hits / slots,
        "nsp_loss": nsp_sum / n,
        "nsp_accuracy": nsp_hits / n,
        "examples": n,
        "mlm_slots": slots,
    }


def heldout_subset(pairs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`size` evenly spaced rows (all of them when there are fewer): no random draw, so every run and
    every seed is scored on the same pairs; the pairs stage shuffled paragraphs, so the rows are spread
    over the whole split rather than a few neighbouring paragraphs."""
    n = len(pairs["nsp_labels"])
    k = min(size, n)
    rows = np.arange(k) * n // max(k, 1)
    return {k: v[rows] for k, v in pairs.items()}


HELDOUT_PASS_PAIRS = 128  # pairs per held-out pass during training (see heldout_batch_size)


def heldout_batch_size(eval_batch_size: int, train_batch_size: int, world: int = 1) -> int:
    """Pairs per evaluation pass during training: at most a rank's share of the batch and at most
    HELDOUT_PASS_PAIRS, so the held-out curve adds little to the training peak (a pass keeps (M, V) fp32
    logits: ~0.6 GB for 1024 pairs, ~75 MB for 128); the figures do not depend on the batch size. Not
    tied to `train.micro_batches`: one bf16 pass of 512 pairs would have made the curve the peak."""
    return min(eval_batch_size, max(1, train_batch_size // world), HELDOUT_PASS_PAIRS)


def heldout_hook(model: torch.nn.Module, pairs: dict[str, np.ndarray], batch_size: int,
                 device: str | torch.device):
    """`fit`'s `on_eval`: step -> {`valid_<metric>`: value} of `evaluate` on `pairs`.

    Give it the bare model, not a DDP wrapper: DDP's forward may sync buffers across ranks, and here
    only rank 0 evaluates while the others wait at the next step's all-reduce. `evaluate` draws no
    random numbers and restores train mode; `fit` reseeds dropout every step, so the training numbers
    are the same with or without these calls (tested bit for bit)."""
    def on_eval(step: int) -> dict[str, float]:
        m = evaluate(model, pairs, batch_size, device, progress=False)
        return {f"valid_{k}": m[k] for k in CURVE}
    return on_eval


def baselines(train: dict[str, np.ndarray], valid: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """What a model that learned nothing but label frequencies scores on `valid`.

    MLM: the unigram of the train pairs' masked labels (real slots only), add-one smoothed over the
    `vocab_size` entries so a word never masked in train still has a finite loss; accuracy is that of
    always predicting its most frequent word (lowest id on a tie), loss the cross-entropy of the whole
    distribution. NSP: the train labels' majority class for accuracy, their class frequencies for the
    loss (a hard 0/1 guess would have an infinite loss)."""
    train_words = train["mlm_labels"][train["mlm_weights"] > 0].astype(np.int64)
    valid_words = valid["mlm_labels"][valid["mlm_weights"] > 0].astype(np.int64)
    if len(train_words) == 0 or len(valid_words) == 0 or len(valid["nsp_labels"]) == 0:
        raise DataError("baselines: the train or valid pairs hold no masked slots or pairs; re-run the pairs stage")
    if max(train_words.max(), valid_words.max()) >= vocab_size:
        raise DataError(f"baselines: a masked label is >= the model's vocabulary size {vocab_size}; "
                        "re-run `dvc repro` so pairs and model share one vocabulary")
    counts = np.bincount(train_words, minlength=vocab_size).astype(np.float64)  # (V,)
    unigram = (counts + 1.0) / (counts.sum() + vocab_size)
    nsp_counts = np.bincount(train["nsp_labels"].astype(np.int64), minlength=2).astype(np.float64)  # (2,)
    nsp_prior = nsp_counts / nsp_counts.sum()
    nsp_valid = valid["nsp_labels"].astype(np.int64)
    with np.errstate(divide="ignore"):  # a class absent from train: its loss is honestly infinite
        nsp_loss = float(-np.log(nsp_prior[nsp_valid]).mean())
    return {
        "baseline_unigram_mlm_loss": float(-np.log(unigram[valid_words]).mean()),
        "baseline_unigram_mlm_accuracy": float((valid_words == counts.argmax()).mean()),
        "baseline_majority_nsp_loss": nsp_loss,
        "baseline_majority_nsp_accuracy": float((nsp_valid == nsp_counts.argmax()).mean()),
    }
