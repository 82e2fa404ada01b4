"""What the held-out curve costs: the evaluation calls' wall time against training time at the defaults.

    python -m bench.eval_cost [--steps 50] [--eval-every 10] [--subset 512] [--batch-size 1024] [--data PATH] [--pairs DIR]

Trains the book's model (params.yaml defaults: ModelConfig(), TrainConfig(), precision auto) with the
real `fit` and the pretrain stage's evaluation hook (`heldout_hook` on `heldout_subset` of the valid
pairs, in batches of at most a training micro-batch), timing each hook call; `fit`'s own `train_s` excludes them. Prints one JSON line per
evaluation and a summary line with `eval_share` = eval seconds / training seconds (the issue's bar:
at most 0.10 at the defaults). Data as in bench.train.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_DATA, DEVICE, load_splits
from minibert import layout
from minibert.config import EvalConfig, ModelConfig, TrainConfig
from minibert.evaluation.heldout import heldout_batch_size, heldout_hook, heldout_subset
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import resolve_precision
from minibert.training.train import train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=TrainConfig().max_steps)
    ap.add_argument("--eval-every", type=int, default=TrainConfig().eval_every)
    ap.add_argument("--subset", type=int, default=EvalConfig().subset_pairs)
    ap.add_argument("--batch-size", type=int, default=EvalConfig().batch_size,
                    help="eval.batch_size (capped, as in the stage, at a training micro-batch)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS)
    a = ap.parse_args()
    tune_cpu_malloc()
    splits, vocab_size, source = load_splits(("train", "valid"), a.data, a.pairs)
    cfg = TrainConfig(max_steps=a.steps, eval_every=a.eval_every, precision=a.precision, checkpoint_every=0)
    batch = heldout_batch_size(a.batch_size, cfg.batch_size)  # as minibert.training.pretrain does
    eval_s: list[float] = []

    def hooks(model, _opt) -> dict:
        score = heldout_hook(model, heldout_subset(splits["valid"], a.subset), batch, DEVICE)

        def on_eval(step: int) -> dict:
            t0 = time.perf_counter()
            m = score(step)
            eval_s.append(time.perf_counter() - t0)
            print(json.dumps({"bench": "eval_cost", "step": step, "eval_s": round(eval_s[-1], 3),
                              **{k: round(v, 4) for k, v in m.items()}}), flush=True)
            return m
        return {"on_eval": on_eval}

    _, res = train_model(ModelConfig(), cfg, splits["train"], vocab_size, device=DEVICE, hooks=hooks)
    amp = resolve_precision(cfg.precision, DEVICE)
    print(json.dumps({"bench": "eval_cost_summary", "steps": a.steps, "eval_every": a.eval_every,
                      "subset_pairs": min(a.subset, len(splits["valid"]["nsp_labels"])), "eval_batch_size": batch,
                      "evals": len(eval_s), "train_s": round(res.train_s, 2), "eval_s": round(sum(eval_s), 2),
                      "eval_ms_each": round(1000 * sum(eval_s) / max(1, len(eval_s)), 1),
                      "eval_share": round(sum(eval_s) / res.train_s, 4),
                      "precision": str(amp).replace("torch.", "") if amp else "fp32",
                      "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "data": source}), flush=True)


if __name__ == "__main__":
    main()
