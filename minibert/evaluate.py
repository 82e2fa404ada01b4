"""Held-out metrics: the pretrained model scored on the fixed valid pairs.

Losses are sums over every real MLM slot (or every pair) divided by the count, accumulated in
float64, so the figures do not depend on `eval.batch_size` (a mean of batch means would weight a
short last batch like a full one). Accuracy is top-1 over the real masked slots only.
"""
from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from minibert.errors import DataError, MinibertError
from minibert.pairs import load_pairs  # noqa: F401 (re-exported: the evaluate stage reads valid pairs)
from minibert.progress import Progress
from minibert.batches import take, to_tensors


def evaluate(model: torch.nn.Module, pairs: dict[str, np.ndarray], batch_size: int,
             device: str | torch.device = "cpu") -> dict:
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
        with torch.inference_mode(), Progress("evaluate", math.ceil(n / batch_size), "batches") as bar:
            for lo in range(0, n, batch_size):
                b = take(data, np.arange(lo, min(lo + batch_size, n)))
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
