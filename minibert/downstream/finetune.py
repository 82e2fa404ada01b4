"""Does pretraining transfer? The fine-tune stage's work: the task's splits, a dev split carved from the
training split, then per seed and per number of labels the pretrained encoder fine-tuned, the same
architecture fine-tuned from random initialisation with the same recipe, the bag-of-words control with
the same dev-based stopping, and the majority class. Every system is scored once on the same test
split, after training; figures are mean ± sample std over the seeds.
"""
from __future__ import annotations

import copy
import time
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
from minibert.downstream.adapt import adapt
from minibert.downstream.classify import Classifier, Recipe, encode_table, fit, predict, scores
from minibert.downstream.controls import BagOfWords, majority
from minibert.downstream.selection import carve_dev, subset
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
    per_seed: pd.DataFrame  # system, seed, labels, train_examples, accuracy, macro_f1, best_epoch, epochs_run,
    # train_s (wall seconds: the stage leaves them out of its per-seed file, which must repeat byte for byte)
    curves: pd.DataFrame  # system, seed, labels, epoch, train_loss, dev_loss, dev_accuracy, lr
    confusion: np.ndarray  # (C, C) of the pretrained model on all labels, summed over seeds
    sizes: dict[str, int]

    def summary(self, labels: int = 0) -> dict[str, dict[str, float]]:
        """{system: {accuracy, accuracy_std, macro_f1, macro_f1_std, seeds}} at `labels` per class (0: all;
        std over seeds, ddof 1)."""
        out = {}
        for system, g in self.per_seed[self.per_seed["labels"] == labels].groupby("system", sort=False):
            row = {"seeds": len(g)}
            for k in ("accuracy", "macro_f1"):
                row[k], row[f"{k}_std"] = float(g[k].mean()), float(g[k].std(ddof=1)) if len(g) > 1 else 0.0
            out[system] = row
        return out

    def label_curve(self) -> pd.DataFrame:
        """labels, train_examples, system, accuracy, accuracy_std: the label-efficiency plot's table."""
        g = self.per_seed.groupby(["labels", "system"], sort=False)
        return (g.agg(train_examples=("train_examples", "mean"), accuracy=("accuracy", "mean"),
                      accuracy_std=("accuracy", lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0))
                .reset_index())


def recipes(cfg: FinetuneConfig) -> dict[str, Recipe]:
    """The one recipe of both BERT columns, and the bag-of-words control's (its own rate, same stopping)."""
    bert = Recipe(cfg.lr, cfg.epochs, cfg.patience, cfg.warmup_share, cfg.batch_size, cfg.min_epoch_examples,
                  cfg.embedding_lr_scale)
    return {"bert": bert, "bag_of_words": Recipe(cfg.bow_lr, cfg.epochs, cfg.patience, cfg.warmup_share,
                                                 cfg.batch_size, cfg.min_epoch_examples)}


def take(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in data.items()}


def run(cfg: FinetuneConfig, pretrained: Callable[[], BERT], vocab: Vocab, train_df: pd.DataFrame,
        test_df: pd.DataFrame, origin: str, log: Callable[[str], None] = print,
        systems: tuple[str, ...] = SYSTEMS[:3]) -> Result:
    """`pretrained()` returns a fresh copy of the pretrained BERT (on its device) for each fine-tuning.
    `systems`: which of pretrained, random_init, bag_of_words to train (the majority class always)."""
    classes, y_all, y_test = labelled.label_ids(train_df, test_df, origin)
    first = pretrained()
    if cfg.max_len > first.cfg.max_len:
        raise ConfigError(f"finetune.max_len = {cfg.max_len} exceeds the pretrained model.max_len "
                          f"{first.cfg.max_len}; lower finetune.max_len")
    device = next(first.parameters()).device
    data_all = encode_table(train_df, vocab, cfg.max_len, cfg.clitics)
    data_test = encode_table(test_df, vocab, cfg.max_len, cfg.clitics)
    train_idx, dev_idx = carve_dev(y_all, cfg.dev_share, cfg.split_seed)
    if cfg.adapt_steps and "pretrained" in systems:  # task-adaptive MLM on the training split's texts only: dev and test stay unseen
        adapted = adapt(pretrained(), train_df["text"].iloc[train_idx], vocab, cfg, log)
        pretrained = lambda: copy.deepcopy(adapted)  # noqa: E731
    C, plan = len(classes), recipes(cfg)
    rows, curves = [], []
    confusion = np.zeros((C, C), np.int64)
    for seed in cfg.seeds:
        for labels in cfg.label_counts:
            idx = train_idx[subset(y_all[train_idx], labels, seed)]
            dev = dev_idx if labels == 0 else dev_idx[subset(y_all[dev_idx], labels, seed)]
            for system in systems:
                if system == "bag_of_words":
                    model = BagOfWords(len(vocab), C).to(device)
                else:
                    bert = pretrained() if system == "pretrained" else build_model(first.cfg, len(vocab), seed).to(device)
                    with torch.random.fork_rng(devices=[]):  # the new output layer's init follows the seed
                        torch.manual_seed(seed)
                        model = Classifier(bert, C, freeze=cfg.freeze, pooling=cfg.pooling).to(device)
                t0 = time.perf_counter()
                info = fit(model, take(data_all, idx), y_all[idx], take(data_all, dev), y_all[dev],
                           plan["bag_of_words" if system == "bag_of_words" else "bert"], seed,
                           lambda r, s=system: curves.append({"system": s, "seed": seed, "labels": labels, **r}))
                s = scores(y_test, predict(model, data_test), C)  # the test split's one look
                if system == "pretrained" and labels == 0:
                    confusion += np.asarray(s["confusion"])
                rows.append({"system": system, "seed": seed, "labels": labels, "train_examples": len(idx),
                             "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "best_epoch": info["best_epoch"],
                             "epochs_run": info["epochs_run"], "train_s": round(time.perf_counter() - t0, 3)})
                log(f"finetune: seed {seed} labels {labels or 'all'} {system}: accuracy {s['accuracy']:.4f}, "
                    f"best epoch {info['best_epoch']} of {info['epochs_run']}")
            s = scores(y_test, majority(y_all[idx], len(y_test)), C)  # fitted on this run's training labels
            rows.append({"system": "majority", "seed": seed, "labels": labels, "train_examples": len(idx),
                         "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "best_epoch": 0, "epochs_run": 0,
                         "train_s": 0.0})
    return Result(classes, pd.DataFrame(rows), pd.DataFrame(curves), confusion,
                  {"train": len(train_idx), "dev": len(dev_idx), "test": len(test_df)})


def metrics(result: Result, cfg: FinetuneConfig, origin: str) -> dict:
    """metrics/finetune.json: the data, the sizes, every system's mean ± std on all labels, and the
    label-efficiency table (accuracy per labels-per-class)."""
    curve = {str(n or "all"): result.summary(n) for n in cfg.label_counts if n}
    return {"task": cfg.task, "data": origin, "classes": result.classes,
            **{f"{k}_examples": v for k, v in result.sizes.items()}, "pooling": cfg.pooling,
            "adapt_steps": cfg.adapt_steps, "freeze": cfg.freeze,
            "best_epochs": result.per_seed.query("labels == 0 and system != 'majority'")
            .groupby("system", sort=False)["best_epoch"].apply(list).to_dict(),
            "systems": result.summary(0) if 0 in cfg.label_counts else {}, "labels_per_class": curve}


def flat_metrics(m: dict) -> dict[str, float]:
    """MLflow scalars: finetune_accuracy.<system> (all labels) and finetune_accuracy_<n>.<system> (n per
    class), each with its _std, and finetune_macro_f1…"""
    out = {f"finetune_{k}.{system}": v for system, row in m["systems"].items() for k, v in row.items() if k != "seeds"}
    for n, systems in m["labels_per_class"].items():
        out |= {f"finetune_accuracy_{n}.{system}{sfx}": row[f"accuracy{sfx}"]
                for system, row in systems.items() for sfx in ("", "_std")}
    return out
