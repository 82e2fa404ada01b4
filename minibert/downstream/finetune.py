"""Does pretraining transfer? The fine-tune stage's work: the task's splits, then per seed the
pretrained encoder fine-tuned, the same architecture fine-tuned from random initialisation with the
same budget, and the bag-of-words control; the majority class once. Everything is scored on the same
held-out split; figures are mean ± sample std over the seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from minibert.config import ConfigError, FinetuneConfig
from minibert.data.pinned import locate
from minibert.data.vocab import Vocab
from minibert.downstream import labelled
from minibert.downstream.classify import Classifier, encode_table, predict, scores, train
from minibert.downstream.controls import BagOfWords, majority
from minibert.model.bert import BERT, build_model

SYSTEMS = ("pretrained", "random_init", "bag_of_words", "majority")


def load_task(cfg: FinetuneConfig, env: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(train, test, a name for the data) of `finetune.task`, split and capped as configured."""
    test = None
    if cfg.task == "file":
        train_df, origin = labelled.read_user(Path(cfg.train_file)), cfg.train_file
        if cfg.test_file:
            test = labelled.read_user(Path(cfg.test_file))
    elif cfg.task == "snli":
        path = locate("snli", env)
        train_df, test, origin = labelled.read_snli(path, "train"), labelled.read_snli(path, "test"), path.name
    else:
        path = locate(cfg.task, env)
        reader = labelled.read_bbc if cfg.task == "bbc" else labelled.read_polarity
        train_df, origin = reader(path), path.name
    if test is None:
        train_df, test = labelled.split(train_df, cfg.test_share, cfg.split_seed)
    return labelled.cap(train_df, cfg.max_train, cfg.split_seed), labelled.cap(test, cfg.max_test, cfg.split_seed), origin


@dataclass
class Result:
    classes: list[str]
    per_seed: pd.DataFrame  # system, seed, accuracy, macro_f1, train_s
    curves: pd.DataFrame  # system, seed, epoch, train_loss, test_accuracy
    confusion: np.ndarray  # (C, C) of the pretrained model, summed over seeds
    sizes: dict[str, int]

    def summary(self) -> dict[str, dict[str, float]]:
        """{system: {accuracy, accuracy_std, macro_f1, macro_f1_std, seeds}} (std over seeds, ddof 1)."""
        out = {}
        for system, g in self.per_seed.groupby("system", sort=False):
            row = {"seeds": len(g)}
            for k in ("accuracy", "macro_f1"):
                row[k], row[f"{k}_std"] = float(g[k].mean()), float(g[k].std(ddof=1)) if len(g) > 1 else 0.0
            out[system] = row
        return out


def run(cfg: FinetuneConfig, pretrained: Callable[[], BERT], vocab: Vocab, train_df: pd.DataFrame,
        test_df: pd.DataFrame, origin: str, log: Callable[[str], None] = print) -> Result:
    """`pretrained()` returns a fresh copy of the pretrained BERT (on its device) for each seed."""
    classes, y_train, y_test = labelled.label_ids(train_df, test_df, origin)
    first = pretrained()
    if cfg.max_len > first.cfg.max_len:
        raise ConfigError(f"finetune.max_len = {cfg.max_len} exceeds the pretrained model.max_len "
                          f"{first.cfg.max_len}; lower finetune.max_len")
    device = next(first.parameters()).device
    data_train = encode_table(train_df, vocab, cfg.max_len)
    data_test = encode_table(test_df, vocab, cfg.max_len)
    C = len(classes)
    rows, curves = [], []
    confusion = np.zeros((C, C), np.int64)
    for seed in cfg.seeds:
        for system in SYSTEMS[:3]:
            if system == "bag_of_words":
                model = BagOfWords(len(vocab), C).to(device)
            else:
                bert = (first if seed == cfg.seeds[0] else pretrained()) if system == "pretrained" \
                    else build_model(first.cfg, len(vocab), seed).to(device)
                with torch.random.fork_rng(devices=[]):  # the new output layer's init follows the seed
                    torch.manual_seed(seed)
                    model = Classifier(bert, C, freeze=cfg.freeze).to(device)

            def on_epoch(epoch: int, loss: float, system=system, model=model, seed=seed) -> None:
                acc = scores(y_test, predict(model, data_test), C)["accuracy"]
                curves.append({"system": system, "seed": seed, "epoch": epoch, "train_loss": loss, "test_accuracy": acc})

            lr = cfg.bow_lr if system == "bag_of_words" else cfg.lr
            train(model, data_train, y_train, cfg.epochs, lr, cfg.batch_size, seed, on_epoch)
            s = scores(y_test, predict(model, data_test), C)
            if system == "pretrained":
                confusion += np.asarray(s["confusion"])
            rows.append({"system": system, "seed": seed, "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]})
            log(f"finetune: seed {seed} {system}: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}")
    s = scores(y_test, majority(y_train, len(y_test)), C)
    rows.append({"system": "majority", "seed": cfg.seeds[0], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]})
    return Result(classes, pd.DataFrame(rows), pd.DataFrame(curves), confusion,
                  {"train": len(train_df), "test": len(test_df)})


def metrics(result: Result, cfg: FinetuneConfig, origin: str) -> dict:
    """metrics/finetune.json: the data, the sizes and every system's mean ± std."""
    return {"task": cfg.task, "data": origin, "classes": result.classes, **{f"{k}_examples": v for k, v in
            result.sizes.items()}, "epochs": cfg.epochs, "freeze": cfg.freeze, "systems": result.summary()}


def flat_metrics(m: dict) -> dict[str, float]:
    """MLflow scalars: finetune_accuracy.<system>, finetune_accuracy_std.<system>, finetune_macro_f1…"""
    return {f"finetune_{k}.{system}": v for system, row in m["systems"].items() for k, v in row.items() if k != "seeds"}
