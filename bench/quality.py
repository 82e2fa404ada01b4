"""Held-out quality vs precision: does bf16 training cost accuracy at the book's config?

    python -m bench.quality [--steps 50,500] [--seeds 0,1,2] [--precision fp32,bf16] [--micro-batches auto]
                            [--data PATH] [--pairs DIR]

For each seed x precision x micro-batch setting (`auto`: what train.micro_batches: auto picks), trains
the book's model (ModelConfig() defaults, batch 512, Adam 1e-3) from scratch with train.seed = seed on
the fixed train pairs with `fit` itself, and evaluates on all the valid pairs through fit's evaluation
hook (minibert.evaluation.heldout.heldout_hook: `evaluate`, fp32, no dropout) at every requested step
count on the way to the largest, so one run per seed x precision x setting serves all step counts;
`train_s` leaves the evaluations out. Prints one JSON line per evaluation, then a mean ± std table per
(precision, micro-batches, steps) and one JSON line per cell.
Expensive: each step takes seconds on 2 cores (the defaults are 6 runs of 500 steps).
Data as in bench.train: `--pairs DIR` (the pipeline's data/pairs) when present, else built from `--data`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, DEVICE, load_splits, micro_batch_settings
from minibert import layout
from minibert.config import EvalConfig, ModelConfig, TrainConfig
from minibert.evaluation.heldout import heldout_hook
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import resolve_micro_batches, resolve_precision
from minibert.training.train import train_model

METRICS = ("mlm_loss", "mlm_accuracy", "nsp_accuracy")


def train_and_evaluate(train: dict, valid: dict, vocab_size: int, seed: int, precision: str,
                       eval_at: list[int], micro_batches: int | str = "auto") -> list[dict]:
    """One run to max(eval_at) steps; held-out metrics at each step count in `eval_at`."""
    # fit calls the hook every gcd(eval_at) steps; the hook scores only the requested ones
    cfg = TrainConfig(seed=seed, precision=precision, max_steps=max(eval_at), eval_every=math.gcd(*eval_at),
                      checkpoint_every=0, micro_batches=micro_batches)
    micro = resolve_micro_batches(micro_batches, DEVICE, resolve_precision(precision, DEVICE))
    out, t0, eval_s = [], time.perf_counter(), 0.0

    def hooks(model, _opt) -> dict:
        score = heldout_hook(model, valid, EvalConfig().batch_size, DEVICE)

        def on_eval(step: int) -> dict | None:
            nonlocal eval_s
            if step not in eval_at:
                return None
            t = time.perf_counter()
            m = score(step)
            eval_s += time.perf_counter() - t
            return m
        return {"on_eval": on_eval, "on_log": on_log}

    def on_log(rows: list[dict]) -> None:
        for r in rows:
            if "valid_mlm_loss" in r:
                row = {"bench": "quality", "precision": precision, "micro_batches": micro, "seed": seed,
                       "steps": r["step"],
                       **{k: round(r[f"valid_{k}"], 5) for k in METRICS}, "train_mlm_loss": round(r["mlm_loss"], 4),
                       "train_nsp_loss": round(r["nsp_loss"], 4),
                       "train_s": round(time.perf_counter() - t0 - eval_s, 1)}  # training only
                print(json.dumps(row), flush=True)
                out.append(row)

    train_model(ModelConfig(), cfg, train, vocab_size, device=DEVICE, hooks=hooks)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std of each metric per (precision, micro-batches, steps), in first-seen order."""
    cells: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["precision"], r.get("micro_batches", 0), r["steps"]), []).append(r)
    out = []
    for (precision, micro, steps), group in cells.items():
        cell = {"bench": "quality_summary", "precision": precision, "micro_batches": micro, "steps": steps,
                "seeds": [r["seed"] for r in group]}
        for k in METRICS:
            values = [r[k] for r in group]
            cell[f"{k}_mean"] = round(statistics.fmean(values), 5)
            cell[f"{k}_std"] = round(statistics.stdev(values), 5) if len(values) > 1 else 0.0
        out.append(cell)
    return sorted(out, key=lambda c: (c["steps"], c["precision"], c["micro_batches"]))


def mean_std(cell: dict, key: str, scale: float = 1.0) -> str:
    return f"{cell[f'{key}_mean'] * scale:.3f} ± {cell[f'{key}_std'] * scale:.3f}"


def table(cells: list[dict]) -> str:
    lines = [f"{'precision':9s} {'micro':>5s} {'steps':>6s} {'seeds':>5s} {'MLM loss':>17s} {'MLM acc %':>15s} "
             f"{'NSP acc %':>15s}"]
    for c in cells:
        lines.append(f"{c['precision']:9s} {c['micro_batches']:5d} {c['steps']:6d} {len(c['seeds']):5d} "
                     f"{mean_std(c, 'mlm_loss'):>17s} "
                     f"{mean_std(c, 'mlm_accuracy', 100):>15s} {mean_std(c, 'nsp_accuracy', 100):>15s}")
    return "\n".join(lines)


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise SystemExit(f"bench.quality: {flag} {text!r} is not a comma-separated list of integers") from None
    if values[0] < (1 if flag == "--steps" else 0):
        raise SystemExit(f"bench.quality: {flag} {text!r}: use positive step counts and seeds >= 0")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="50,500", help="comma-separated step counts to evaluate at")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated train seeds")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--micro-batches", default="auto", help="comma-separated train.micro_batches: integers or auto")
    ap.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 folder or zip (pairs built in-process)")
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS, help="pipeline pairs folder, used if present")
    a = ap.parse_args()
    steps, seeds, precisions = int_list(a.steps, "--steps"), int_list(a.seeds, "--seeds"), a.precision.split(",")
    micro = micro_batch_settings(a.micro_batches, "bench.quality")
    if bad := [p for p in precisions if p not in ("fp32", "bf16")]:
        raise SystemExit(f"bench.quality: --precision {','.join(bad)} unknown; use fp32, bf16 or fp32,bf16")
    tune_cpu_malloc()
    splits, vocab_size, source = load_splits(("train", "valid"), a.data, a.pairs)
    print(f"train {len(splits['train']['nsp_labels'])} / valid {len(splits['valid']['nsp_labels'])} pairs ({source}); "
          f"vocab {vocab_size}; seeds {seeds} x {precisions}, evaluated at steps {steps}", file=sys.stderr)
    rows = [r for seed in seeds for p in precisions for k in micro
            for r in train_and_evaluate(splits["train"], splits["valid"], vocab_size, seed, p, steps, k)]
    cells = summarize(rows)
    print(table(cells))
    for c in cells:
        print(json.dumps(c))


if __name__ == "__main__":
    main()
