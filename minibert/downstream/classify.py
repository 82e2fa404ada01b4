"""Fine-tuning a classifier over the encoder: the input layout, the pooling, the training loop with
its dev-based early stopping, and the scores.

Inputs follow the book's pair layout: `<cls> a <sep>` (segment 0) then `b <sep>` (segment 1) for pairs,
texts lower-cased, punctuation split and clitics split off as WikiText writes them
(`minibert.data.text.wikitext_words`: "don't" → "do n't"), the longer side trimmed first when a pair
is too long. The recipe (`fit`): Adam with linear warmup and linear decay over `epochs`, the dev split
scored after every epoch, training stopped after `patience` epochs without a better dev accuracy, and
the best epoch's weights restored; the test split is never seen here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from minibert.data.text import normalise, wikitext_words
from minibert.data.vocab import PAD, UNK, Vocab, pair_ids
from minibert.downstream.stopping import EarlyStopping, lr_factor
from minibert.errors import DataError
from minibert.model.bert import BERT

POOLINGS = ("cls", "mean", "both")


def words(text: str, clitics: bool) -> list[str]:
    return wikitext_words(text) if clitics else normalise(text).split()


def encode_table(df: pd.DataFrame, vocab: Vocab, max_len: int, clitics: bool = True) -> dict[str, np.ndarray]:
    """tokens/segments (N, max_len) padded with `<pad>`, valid_lens (N,); a text whose words are all
    unknown to the vocabulary is one error line naming its file and row."""
    N = len(df)
    tokens = np.full((N, max_len), PAD, np.int64)
    segments = np.zeros((N, max_len), np.int64)
    valid = np.zeros(N, np.int64)
    for i, (text, text_b, where) in enumerate(zip(df["text"], df["text_b"], df["where"])):
        sides = [vocab.encode(words(t, clitics)) for t in (text, text_b) if isinstance(t, str)]
        for side in sides:
            if not side or all(t == UNK for t in side):
                raise DataError(f"{where}: no word of the text is in the vocabulary (all <unk>); "
                                "fix or drop the row, or pretrain on text that covers it")
        ids, segs = pair_ids(sides[0], sides[1] if len(sides) > 1 else None, max_len)
        tokens[i, :len(ids)], segments[i, :len(segs)], valid[i] = ids, segs, len(ids)
    return {"tokens": tokens, "segments": segments, "valid_lens": valid}


def mean_pool(enc: Tensor, valid_lens: Tensor) -> Tensor:
    """(B, T, H), (B,) -> (B, H): the mean over each row's real tokens (<cls> and <sep> included)."""
    keep = (torch.arange(enc.shape[1], device=enc.device) < valid_lens.to(enc.device)[:, None]).to(enc.dtype)  # (B, T)
    return (enc * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)  # (B, H)


class Classifier(nn.Module):
    """Encoder + the NSP hidden layer (Linear, Tanh) + a new output layer. `pooling`: `cls` (the book:
    the `<cls>` vector), `mean` (the mean over real tokens) or `both` (the two hidden vectors side by
    side). `freeze`: only the hidden and output layers learn; the encoder stays as pretrained."""

    def __init__(self, bert: BERT, n_classes: int, freeze: bool = False, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        self.bert, self.hidden, self.pooling = bert, bert.nsp_hidden, pooling
        self.output = nn.Linear(bert.cfg.hidden * (2 if pooling == "both" else 1), n_classes)
        for name, p in bert.named_parameters():
            p.requires_grad_(not freeze or name.startswith("nsp_hidden."))

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        enc = self.bert.encode(tokens, segments, valid_lens)  # (B, T, H)
        if self.pooling == "cls":
            features = self.hidden(enc[:, 0])  # (B, H)
        elif self.pooling == "mean":
            features = self.hidden(mean_pool(enc, valid_lens))  # (B, H)
        else:  # both: each pooled vector through the same hidden layer, side by side
            features = torch.cat([self.hidden(enc[:, 0]), self.hidden(mean_pool(enc, valid_lens))], -1)  # (B, 2H)
        return self.output(features)  # (B, C)


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _inputs(data: dict[str, np.ndarray], idx: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    T = int(data["valid_lens"][idx].max())  # no column wider than the batch's longest input
    return tuple(torch.from_numpy(data[k][idx][..., :T] if k != "valid_lens" else data[k][idx]).to(device)
                 for k in ("tokens", "segments", "valid_lens"))


def logits(model: nn.Module, data: dict[str, np.ndarray], batch_size: int = 256) -> Tensor:
    """(N, C) fp32 logits in eval mode, on the CPU."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for idx in batches(len(data["valid_lens"]), batch_size, None):
            out.append(model(*_inputs(data, idx, device)).float().cpu())
    model.train(was)
    return torch.cat(out)


def predict(model: nn.Module, data: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Class ids (N,) in eval mode."""
    return logits(model, data, batch_size).argmax(-1).numpy()


@dataclass(frozen=True)
class Recipe:
    """How one classifier is trained: the `finetune` section's keys for one system."""
    lr: float
    epochs: int             # at most this many; the rate decays to 0 at the end of the last
    patience: int           # epochs without a better dev accuracy before stopping
    warmup_share: float     # share of all steps of `epochs` spent rising linearly to `lr`
    batch_size: int
    min_epoch_examples: int = 0  # a smaller training set is cycled (reshuffled) to fill an epoch
    embedding_lr_scale: float = 1.0  # the embeddings' rate = lr x this


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Adam's groups: the embeddings (token, position, segment) at `lr × embedding_lr_scale`, the rest at
    `lr`. Why: Adam moves every weight by about the rate a step, and these embeddings start at N(0, 1)
    (torch's default, the book's) where the matrices are ~0.1, so one rate that suits the matrices leaves
    the word vectors where pretraining (or the random init) put them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    emb = [p for n, p in named if "embedding" in n.split(".")[-2 if n.endswith(".weight") else -1]]
    rest = [p for n, p in named if all(p is not q for q in emb)]
    groups = [{"params": rest, "lr": recipe.lr, "scale": 1.0}]
    if emb:
        groups.append({"params": emb, "lr": recipe.lr * recipe.embedding_lr_scale, "scale": recipe.embedding_lr_scale})
    return groups


def epoch_batches(n: int, recipe: Recipe, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: whole shuffled passes over the n examples, as many as fill
    `min_epoch_examples` (so 50 labels still make an epoch of some steps between dev checks)."""
    passes = max(1, -(-recipe.min_epoch_examples // n))
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])
    return [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]


def fit(model: nn.Module, data: dict[str, np.ndarray], labels: np.ndarray, dev: dict[str, np.ndarray],
        dev_labels: np.ndarray, recipe: Recipe, seed: int,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train with the recipe, shuffled by `seed` (the dropout draws come from a torch RNG seeded with it
    too, so a run is repeatable), score the dev split after every epoch, stop early, restore the best
    epoch. `on_epoch(row)` gets {epoch, train_loss, dev_loss, dev_accuracy, lr}. -> {best_epoch,
    epochs_run, best_dev_accuracy}."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(param_groups(model, recipe), lr=recipe.lr)
    y, y_dev = torch.tensor(labels), torch.tensor(dev_labels)  # copies: ids may come from read-only buffers
    per_epoch = -(-len(labels) * max(1, -(-recipe.min_epoch_examples // len(labels))) // recipe.batch_size)
    total, warmup = recipe.epochs * per_epoch, round(recipe.warmup_share * recipe.epochs * per_epoch)
    stopper, step = EarlyStopping(recipe.patience), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(1, recipe.epochs + 1):
            loss_sum = 0.0
            seen = 0
            for idx in epoch_batches(len(labels), recipe, rng):
                for group in opt.param_groups:
                    group["lr"] = recipe.lr * group["scale"] * lr_factor(step, total, warmup)
                loss = nn.functional.cross_entropy(model(*_inputs(data, idx, device)).float(), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)  # the batch mean weighted by its size: a true epoch mean
                seen += len(idx)
            dev_logits = logits(model, dev)
            row = {"epoch": epoch, "train_loss": loss_sum / seen,
                   "dev_loss": float(nn.functional.cross_entropy(dev_logits, y_dev)),
                   "dev_accuracy": float((dev_logits.argmax(-1) == y_dev).float().mean()),
                   "lr": opt.param_groups[0]["lr"]}
            if on_epoch is not None:
                on_epoch(row)
            if stopper.update(epoch, row["dev_accuracy"], -row["dev_loss"], lambda: copy.deepcopy(model.state_dict())):
                break
    model.load_state_dict(stopper.best_state)
    return {"best_epoch": stopper.best_epoch, "epochs_run": epoch, "best_dev_accuracy": stopper.best_score}


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
