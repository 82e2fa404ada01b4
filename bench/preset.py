"""Time to reach a held-out MLM loss, per recipe: the book's vs the other presets of params.yaml.

    python -m bench.preset [--presets book,pre_ln] [--target 6.77] [--every 5] [--max-steps 100]

Each preset of params.yaml (`preset: NAME` applied by the config loader) trains from scratch on the
train pairs with its own model and train sections (schedule included), and is evaluated on the valid
pairs every `--every` steps until the MLM loss (real masked slots) reaches `--target` — by default
d2l's own 50-step held-out figure (6.77). Prints steps and training seconds to the target, one JSON
line per preset. Precision is the preset's (`train.precision`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from bench.train import DEFAULT_DATA, DEVICE, load_splits
from minibert import layout
from minibert.batches import take, to_tensors
from minibert.config import config_from_dict
from minibert.evaluate import evaluate
from minibert.heap import tune_cpu_malloc
from minibert.model import build_model
from minibert.train import batch_indices, get_lr, make_optimizer, resolve_precision, step_seed, train_step

ROOT = Path(__file__).resolve().parents[1]


def time_to_target(name: str, raw: dict, train: dict, valid: dict, vocab_size: int, target: float,
                   every: int, max_steps: int) -> dict:
    cfg = config_from_dict({**raw, "preset": name}, str(layout.PARAMS))
    tcfg = cfg.train
    amp = resolve_precision(tcfg.precision, DEVICE)
    data = to_tensors(train, DEVICE)
    model = build_model(cfg.model, vocab_size, seed=tcfg.seed).to(DEVICE)
    opt = make_optimizer(model.parameters(), tcfg)
    train_s, loss, step = 0.0, float("inf"), 0
    while step < max_steps and loss > target:
        model.train()
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = get_lr(step, tcfg)
        batch = take(data, batch_indices(step, len(data["nsp_labels"]), tcfg.batch_size, tcfg.seed))
        torch.manual_seed(step_seed(tcfg.seed, 0, step))
        train_step(model, opt, None, batch, 1.0, 1.0, amp, DEVICE, tcfg.micro_batches)
        train_s += time.perf_counter() - t0
        step += 1
        if step % every == 0:
            loss = evaluate(model, valid, cfg.eval.batch_size, DEVICE)["mlm_loss"]
    return {"bench": "preset", "preset": name, "target_mlm_loss": target, "reached": loss <= target,
            "steps": step, "train_s": round(train_s, 1), "valid_mlm_loss": round(loss, 4),
            "precision": str(amp).replace("torch.", "") if amp else "fp32", "max_steps": tcfg.max_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="book,pre_ln")
    ap.add_argument("--target", type=float, default=6.77)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=100)
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
