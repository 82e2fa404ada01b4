"""Fine-tuning a classifier on `<cls>`: the book's BERTClassifier (the pretrained encoder, its NSP
hidden layer, a new linear output), the input layout, the training loop and the scores.

Inputs follow the book's pair layout: `<cls> a <sep>` (segment 0) then `b <sep>` (segment 1) for pairs,
texts lower-cased and punctuation split as the text corpus is (`minibert.data.text.normalise`), the
longer side trimmed first when a pair is too long.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from minibert.data.text import normalise
from minibert.data.vocab import PAD, UNK, Vocab, pair_ids
from minibert.errors import DataError
from minibert.model.bert import BERT


def encode_table(df: pd.DataFrame, vocab: Vocab, max_len: int) -> dict[str, np.ndarray]:
    """tokens/segments (N, max_len) padded with `<pad>`, valid_lens (N,); a text whose words are all
    unknown to the vocabulary is one error line naming its file and row."""
    N = len(df)
    tokens = np.full((N, max_len), PAD, np.int64)
    segments = np.zeros((N, max_len), np.int64)
    valid = np.zeros(N, np.int64)
    for i, (text, text_b, where) in enumerate(zip(df["text"], df["text_b"], df["where"])):
        sides = [vocab.encode(normalise(t).split()) for t in (text, text_b) if isinstance(t, str)]
        for side in sides:
            if not side or all(t == UNK for t in side):
                raise DataError(f"{where}: no word of the text is in the vocabulary (all <unk>); "
                                "fix or drop the row, or pretrain on text that covers it")
        ids, segs = pair_ids(sides[0], sides[1] if len(sides) > 1 else None, max_len)
        tokens[i, :len(ids)], segments[i, :len(segs)], valid[i] = ids, segs, len(ids)
    return {"tokens": tokens, "segments": segments, "valid_lens": valid}


class Classifier(nn.Module):
    """Encoder + the NSP hidden layer (Linear, Tanh) + a new output layer, on the `<cls>` vector.
    `freeze`: only the hidden and output layers learn; the encoder stays as pretrained."""

    def __init__(self, bert: BERT, n_classes: int, freeze: bool = False):
        super().__init__()
        self.bert, self.hidden = bert, bert.nsp_hidden
        self.output = nn.Linear(bert.cfg.hidden, n_classes)
        for name, p in bert.named_parameters():
            p.requires_grad_(not freeze or name.startswith("nsp_hidden."))

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        enc = self.bert.encode(tokens, segments, valid_lens)  # (B, T, H)
        return self.output(self.hidden(enc[:, 0]))  # (B, C)


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _inputs(data: dict[str, np.ndarray], idx: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    T = int(data["valid_lens"][idx].max())  # no column wider than the batch's longest input
    return tuple(torch.from_numpy(data[k][idx][..., :T] if k != "valid_lens" else data[k][idx]).to(device)
                 for k in ("tokens", "segments", "valid_lens"))


def predict(model: nn.Module, data: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Class ids (N,) in eval mode."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for idx in batches(len(data["valid_lens"]), batch_size, None):
            out.append(model(*_inputs(data, idx, device)).argmax(-1).cpu().numpy())
    model.train(was)
    return np.concatenate(out)


def train(model: nn.Module, data: dict[str, np.ndarray], labels: np.ndarray, epochs: int, lr: float,
          batch_size: int, seed: int, on_epoch=None) -> list[float]:
    """Adam at a constant `lr` (the book's fine-tuning), shuffled by `seed`; the dropout draws come from
    a torch RNG seeded with it too, so a run is repeatable. -> mean training loss per epoch; `on_epoch(e,
    loss)` is called after each."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    y = torch.tensor(labels)  # a copy: label ids may come from a read-only pandas buffer
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(1, epochs + 1):
            total = 0.0
            for idx in batches(len(labels), batch_size, rng):
                loss = nn.functional.cross_entropy(model(*_inputs(data, idx, device)).float(), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / len(labels))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    return losses


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """accuracy, macro-F1 (a class never predicted nor present scores 0) and the confusion matrix
    (rows: true class, columns: predicted)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    denom = confusion.sum(0) + confusion.sum(1)  # predicted + true per class: 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return {"accuracy": float(tp.sum() / max(len(y_true), 1)), "macro_f1": float(f1.mean()),
            "confusion": confusion.tolist()}
