"""Whole training steps of two (or more) checkouts, interleaved: is one code version faster than another?

    python -m bench.ab --code OTHER_CHECKOUT . [--rounds 8] [--steps 10] [--micro-batches auto] [--precision auto] [--data PATH]

On the shared 2-core machines a step's time swings by +-10 % from minute to minute, so one run of each
version compares the machine's moods, not the code. Here each round runs every checkout once, in turn,
as its own process (its own `minibert`, its own C++ kernel build): a fresh model (the book's
config) in `--precision` (default `auto`: what `train.precision: auto` picks on this CPU, bf16 where it
multiplies bf16 natively, fp32 elsewhere, e.g. on an AVX2-only CPU, where bf16 is emulated), 2 warm-up
steps, then `--steps` timed calls of that checkout's `minibert.training.loop.train_step`
on the real WikiText-2 train pairs (built once by this checkout's pipeline functions, as bench.train
does) in `fit`'s batch order. A round reports each checkout's median step; the summary gives the
median over rounds, the best step, and each round's ratio to the first checkout (a burst of load
hits one round, not one version). Make the other checkout with `git worktree add DIR REV`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import DEFAULT_DATA, load_splits, micro_batch_settings
from minibert import layout
from minibert.artifacts import save_arrays
from minibert.training.loop import resolve_micro_batches, resolve_precision

CHILD = """
import json, sys, time
code, pairs, steps, micro, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, code)
import torch
from safetensors.numpy import load_file
import minibert
assert minibert.__file__.startswith(code), minibert.__file__
from minibert.data.batches import gather_batch, to_tensors
from minibert.config import ModelConfig, TrainConfig
from minibert.training.heap import tune_cpu_malloc
from minibert.model.bert import build_model
from minibert.training.loop import make_optimizer, resolve_precision, train_step
from minibert.data.batches import batch_indices
tune_cpu_malloc()
dtype = resolve_precision(precision, torch.device("cpu"))
arrays = load_file(pairs)
vocab = int(arrays.pop("vocab_size")[0])
data = to_tensors(arrays, torch.device("cpu"))
model = build_model(ModelConfig(), vocab, 0).train()
opt = make_optimizer(model.parameters(), TrainConfig())
n, times = len(data["nsp_labels"]), []
for s in range(2 + steps):
    torch.manual_seed(s)
    batch = gather_batch(data, batch_indices(s, n, 512, 0))
    t0 = time.perf_counter()
    mlm, _ = train_step(model, opt, None, batch, 1.0, 1.0, dtype, torch.device("cpu"), micro)
    float(mlm)
    times.append(time.perf_counter() - t0)
print(json.dumps({"ms": [round(t * 1e3, 2) for t in times[2:]], "mlm_last": float(mlm)}))
"""


def run_one(code: Path, pairs: Path, steps: int, micro: int, precision: str = "auto") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(code), str(pairs), str(steps), str(micro), precision],
                         cwd=code, capture_output=True, text=True)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench.ab: {code}: the child failed ({tail})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", nargs="+", type=Path, default=[Path(".")], help="checkouts to compare; first = base")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per checkout per round (after 2 warm-up)")
    ap.add_argument("--micro-batches", default="auto",
                    help="train.micro_batches of every checkout: an integer, or auto (this checkout's rule for "
                         "the precision: 1 in bf16, 4 in fp32 on CPU)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="train.precision of every checkout (auto: bf16 where the CPU has bf16 instructions)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 folder or zip (pairs built in-process)")
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS, help="pipeline pairs folder, used if present")
    a = ap.parse_args()
    codes = [c.resolve() for c in a.code]
    if bad := [str(c) for c in codes if not (c / "minibert" / "training" / "loop.py").is_file()]:
        raise SystemExit(f"bench.ab: {', '.join(bad)}: not a minibert checkout (no minibert/training/loop.py); "
                         "make one with `git worktree add DIR REV`")
    setting = micro_batch_settings(a.micro_batches, "bench.ab")
    if len(setting) != 1:
        raise SystemExit(f"bench.ab: --micro-batches {a.micro_batches!r}: one setting, an integer >= 1 or auto")
    cpu = torch.device("cpu")
    # resolved here, once, so every checkout (an older one too) runs the same number of passes
    a.micro_batches = resolve_micro_batches(setting[0], cpu, resolve_precision(a.precision, cpu))
    if a.rounds < 1 or a.steps < 1:
        raise SystemExit("bench.ab: --rounds and --steps must be >= 1")
    splits, vocab, source = load_splits(("train",), a.data, a.pairs)
    medians: list[list[float]] = [[] for _ in codes]  # by position: the same checkout may be given twice
    best = [float("inf")] * len(codes)
    with tempfile.TemporaryDirectory(prefix="minibert-ab-") as tmp:
        pairs = Path(tmp) / "train.safetensors"
        save_arrays(pairs, {**splits["train"], "vocab_size": np.array([vocab], dtype=np.int64)})
        print(f"train pairs: {len(splits['train']['nsp_labels'])} ({source}); {a.rounds} rounds x {a.steps} steps, "
              f"{a.precision} ({resolve_precision(a.precision, torch.device('cpu')) or 'fp32'}), "
              f"{a.micro_batches} micro-batches", file=sys.stderr)
        for r in range(a.rounds):
            for i, c in enumerate(codes):
                t0 = time.perf_counter()
                res = run_one(c, pairs, a.steps, a.micro_batches, a.precision)
                med = statistics.median(res["ms"])
                medians[i].append(med)
                best[i] = min(best[i], min(res["ms"]))
                print(json.dumps({"bench": "ab", "round": r, "code": str(c), "median_ms": med, "min_ms": min(res["ms"]),
                                  "mlm_last": round(res["mlm_last"], 4), "wall_s": round(time.perf_counter() - t0, 1)}),
                      flush=True)
    for i, c in enumerate(codes):
        ratios = [m / b for m, b in zip(medians[i], medians[0])]
        print(json.dumps({"bench": "ab_summary", "code": str(c), "median_of_medians_ms": round(statistics.median(
            medians[i]), 1), "best_ms": best[i], "ratio_to_first_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}))


if __name__ == "__main__":
    main()
