"""Time to reach a held-out MLM loss, per recipe: the book's vs the other presets of params.yaml.

    python -m bench.preset [--presets book,pre_ln] [--target 6.77] [--every 5] [--max-steps N]

Each preset of params.yaml (`preset: NAME` applied by the config loader) trains from scratch on the
train pairs with its own model and train sections (schedule included) through `fit` itself, and is
evaluated on the valid pairs through fit's evaluation hook every `--every` steps until the MLM loss
(real masked slots) reaches `--target` — by default d2l's own 50-step held-out figure (6.77) — or
the recipe's `train.max_steps` (`--max-steps` overrides it, and with it a linear schedule's horizon).
Prints steps and training seconds to the target, one JSON line per preset. Precision is the preset's
(`train.precision`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import yaml

from bench.common import DEFAULT_DATA, DEVICE, load_splits
from minibert import layout
from minibert.config import config_from_dict
from minibert.evaluation.heldout import heldout_hook
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import resolve_precision
from minibert.training.train import train_model


class Reached(Exception):
    """Raised by the evaluation hook to end `fit` once the target is met."""

ROOT = Path(__file__).resolve().parents[1]


def time_to_target(name: str, raw: dict, train: dict, valid: dict, vocab_size: int, target: float,
                   every: int, max_steps: int | None) -> dict:
    cfg = config_from_dict({**raw, "preset": name}, str(layout.PARAMS))
    tcfg = dataclasses.replace(cfg.train, eval_every=every, checkpoint_every=0,
                               max_steps=max_steps or cfg.train.max_steps)
    amp = resolve_precision(tcfg.precision, DEVICE)
    t0, eval_s, train_s, loss, step = time.perf_counter(), 0.0, 0.0, float("inf"), 0

    def hooks(model, _opt) -> dict:
        score = heldout_hook(model, valid, cfg.eval.batch_size, DEVICE)

        def on_eval(at: int) -> dict:
            nonlocal eval_s, loss, step, train_s
            train_s, t = time.perf_counter() - t0 - eval_s, time.perf_counter()  # training only
            m = score(at)
            eval_s += time.perf_counter() - t
            loss, step = m["valid_mlm_loss"], at
            if loss <= target:
                raise Reached
            return m
        return {"on_eval": on_eval}

    try:
        train_model(cfg.model, tcfg, train, vocab_size, device=DEVICE, hooks=hooks)
    except Reached:
        pass
    return {"bench": "preset", "preset": name, "target_mlm_loss": target, "reached": loss <= target,
            "steps": step, "train_s": round(train_s, 1), "valid_mlm_loss": round(loss, 4),
            "precision": str(amp).replace("torch.", "") if amp else "fp32", "max_steps": tcfg.max_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="book,pre_ln")
    ap.add_argument("--target", type=float, default=6.77)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None, help="default: the recipe's train.max_steps")
    ap.add_argument("--params", type=Path, default=ROOT / layout.PARAMS)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS)
    a = ap.parse_args()
    tune_cpu_malloc()
    splits, vocab_size, _ = load_splits(("train", "valid"), a.data, a.pairs)
    raw = yaml.safe_load(a.params.read_text())
    for name in a.presets.split(","):
        print(json.dumps(time_to_target(name, raw, splits["train"], splits["valid"], vocab_size, a.target,
                                        a.every, a.max_steps)), flush=True)


if __name__ == "__main__":
    main()
