"""Where one recipe's figures part: the same recipe and seed trained under other numerics (thread count,
precision, the GEMM code another CPU kind runs, minibert's C++ kernels off) beside other seeds.

    python -m bench.numerics [--recipe budget:2273] [--variants base,threads=1,isa=AVX512_CORE_BF16,...]
                             [--jobs 1] [--points STEPS] [--below 6.0] [--rows FILE] [--pairs DIR] [--out DIR] [--smoke]

Every variant trains `--recipe` (a params.yaml preset and its step count, the schedule fitted to it, as
bench.transfer does) on the pipeline's pairs with `train_model`, logging the train losses of every step,
then scores the full valid split. A variant is `base` (seed 0, precision auto, one thread per core, no
variable set) or `+`-joined changes to it:
  threads=T    torch.set_num_threads(T): another split of every reduction across threads
  fp32 / bf16  train.precision
  isa=NAME     ONEDNN_MAX_CPU_ISA=NAME: the bf16 GEMMs (oneDNN) capped at an older ISA, i.e. the kernels
               another CPU kind runs. AVX512_CORE_BF16 is what an AMD Zen 4/5 (AVX512-BF16, no AMX) runs
  mkl=NAME     MKL_ENABLE_INSTRUCTIONS=NAME: the fp32 GEMMs (MKL) capped, e.g. AVX2 (MKL's path on AMD)
  portable     MINIBERT_PORTABLE=1: minibert's C++ kernels off (the plain torch ops a GPU runs)
  seed=S       train.seed = S: the seed spread, to compare the others against
Each run is a child process (`--child`) so that its variables are set before torch loads; `--jobs N`
runs N at once (the numbers do not depend on load; wall times then do). The GEMM code each child took
(oneDNN's implementation of a bf16 Linear, MKL's path for an fp32 one) is read from their verbose output.

For each variant the table gives: the first step whose train MLM loss differs from base's (at 1e-6), the
mean train MLM loss over the 50 steps ending at a few points, `max rise` (the largest climb of that mean
above its lowest earlier value: a loss spike shows there), `step < L` (when that mean first fell under
`--below`; 6.0 marks the budget recipe leaving its plateau near 6.4 nats, where it predicts words by
their frequency) and the held-out MLM loss and accuracy; under it, the held-out spread over the seeds and
over the numerics, and its correlation with `step < L`. Results: rows.jsonl (one line per run, every
step's losses included) and table.md in `--out` (default bench/results/<date>-numerics-<commit>/);
`--rows FILE` redraws table.md from a rows.jsonl without training. `--smoke`: a tiny model, synthetic pairs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_DATA
from minibert import layout

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 50  # steps per mean when comparing curves: one step's loss is mostly its batch


def parse_variant(text: str) -> dict:
    """`base` or `+`-joined items -> {env, threads, precision, seed}; anything else is one SystemExit line."""
    v = {"env": {}, "threads": os.cpu_count() or 1, "precision": "auto", "seed": 0}
    for item in ([] if text == "base" else text.split("+")):
        key, _, value = item.partition("=")
        if key == "threads" and value.isdigit() and int(value) >= 1:
            v["threads"] = int(value)
        elif key in ("fp32", "bf16") and not value:
            v["precision"] = key
        elif key == "isa" and value:
            v["env"]["ONEDNN_MAX_CPU_ISA"] = value
        elif key == "mkl" and value:
            v["env"]["MKL_ENABLE_INSTRUCTIONS"] = value
        elif key == "portable" and not value:
            v["env"]["MINIBERT_PORTABLE"] = "1"
        elif key == "seed" and value.isdigit():
            v["seed"] = int(value)
        else:
            raise SystemExit(f"bench.numerics: variant {text!r}: unknown item {item!r}; use threads=T, fp32, "
                             "bf16, isa=NAME, mkl=NAME, portable or seed=S joined by +")
    return v


def gemm_kernels() -> str:
    """The GEMM code this process's variables select: oneDNN's implementation of a bf16 Linear under autocast
    (ONEDNN_VERBOSE) and MKL's code path for an fp32 one (MKL_VERBOSE), read in a grandchild."""
    code = ("import torch; x = torch.randn(512, 128); w = torch.nn.Linear(128, 256); w(x)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16): w(x)")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"},
                       capture_output=True, text=True)
    fields = [line.split(",") for line in p.stdout.splitlines() if line.startswith("onednn_verbose,")]
    onednn = [f[6] for f in fields if len(f) > 6 and f[3] == "exec" and f[5] == "matmul"]
    mkl = re.search(r"\(Intel\(R\) (AVX[^)]*)\)", p.stdout + p.stderr)
    return f"{onednn[-1] if onednn else 'no oneDNN matmul'}; MKL {mkl.group(1) if mkl else '?'}"


def child(spec: dict) -> None:
    """One run (in its own process, its variables already set): prints one JSON line."""
    import torch
    import yaml

    from bench.common import DEVICE, load_splits
    from bench.time_to_quality import recipe_config, smoke_data
    from minibert.evaluation.heldout import evaluate
    from minibert.training.train import train_model

    torch.set_num_threads(spec["threads"])
    name, steps = spec["recipe"].split(":")
    cfg = recipe_config(name, yaml.safe_load((ROOT / layout.PARAMS).read_text()), spec["smoke"])
    if spec["smoke"]:
        train, valid, V = smoke_data()
    else:
        splits, V, _ = load_splits(("train", "valid"), spec["data"], Path(spec["pairs"]))
        train, valid = splits["train"], splits["valid"]
    tcfg = dataclasses.replace(cfg.train, seed=spec["seed"], max_steps=int(steps), precision=spec["precision"],
                               log_every=1, eval_every=0, checkpoint_every=0)
    mlm, nsp = {}, {}

    def on_log(rows: list[dict]) -> None:
        for r in rows:
            mlm[r["step"]], nsp[r["step"]] = r["mlm_loss"], r["nsp_loss"]

    t0 = time.perf_counter()
    model, _ = train_model(cfg.model, tcfg, train, V, device=DEVICE, hooks=lambda m, o: {"on_log": on_log})
    train_s = time.perf_counter() - t0
    held = evaluate(model, valid, cfg.eval.batch_size, DEVICE, progress=False)
    steps_seen = sorted(mlm)
    print(json.dumps({**{k: spec[k] for k in ("variant", "seed", "threads", "precision", "env")},
                      "gemm": gemm_kernels(), "train_s": round(train_s, 1),
                      "heldout_mlm_loss": held["mlm_loss"], "heldout_mlm_accuracy": held["mlm_accuracy"],
                      "heldout_nsp_accuracy": held["nsp_accuracy"],
                      "mlm": [mlm[s] for s in steps_seen], "nsp": [nsp[s] for s in steps_seen]}), flush=True)


def run_one(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                             "MINIBERT_PORTABLE", "OMP_NUM_THREADS")}
    env.update({**spec["env"], "OMP_NUM_THREADS": str(spec["threads"])})
    p = subprocess.run([sys.executable, "-m", "bench.numerics", "--child", json.dumps(spec)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench.numerics: variant {spec['variant']} failed: {p.stderr.strip().splitlines()[-1:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in row.items() if k not in ("mlm", "nsp")}), flush=True)
    return row


def windowed(losses: list[float]) -> np.ndarray:
    """Mean over the WINDOW steps ending at each step (shorter at the start)."""
    x = np.asarray(losses, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(0, ends - WINDOW)
    return (c[ends] - c[starts]) / (ends - starts)


def first_difference(a: list[float], b: list[float], tol: float = 1e-6) -> int | None:
    """The first step (1-based) where the two curves differ by more than tol; None if never."""
    diff = np.abs(np.asarray(a) - np.asarray(b)) > tol
    return int(np.argmax(diff)) + 1 if diff.any() else None


def max_rise(losses: list[float], skip: int) -> float:
    """The largest climb of the windowed loss above its lowest earlier value, after `skip` steps."""
    w = windowed(losses)[skip:]
    return float(np.max(w - np.minimum.accumulate(w))) if len(w) else 0.0


def first_below(losses: list[float], level: float, skip: int) -> int | None:
    """The first step after `skip` whose windowed loss is under `level` (when a run left a plateau above it)."""
    below = windowed(losses)[skip:] < level
    return int(np.argmax(below)) + skip + 1 if below.any() else None


def table(rows: list[dict], points: list[int], level: float) -> str:
    base = rows[0]
    head = ["variant", "GEMM code (bf16 oneDNN; fp32 MKL)", "first step ≠ base"] + [f"train MLM @{p}" for p in points] + \
           ["max rise", f"step < {level}", "held-out MLM", "MLM acc %", "train s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    steps_below = [first_below(r["mlm"], level, WINDOW * 4) for r in rows]
    for r, below in zip(rows, steps_below):
        w = windowed(r["mlm"])
        first = "—" if r is base else (first_difference(base["mlm"], r["mlm"]) or "never")
        out.append("| " + " | ".join([r["variant"], r["gemm"], str(first)] + [f"{w[p - 1]:.4f}" for p in points] +
                                     [f"{max_rise(r['mlm'], WINDOW * 4):.3f}",
                                      str(below or "—"), f"{r['heldout_mlm_loss']:.4f}",
                                      f"{100 * r['heldout_mlm_accuracy']:.2f}", f"{r['train_s']:.0f}"]) + " |")
    held = np.array([r["heldout_mlm_loss"] for r in rows])
    seeds = [r for r in rows if r["variant"] == "base" or r["variant"].startswith("seed=")]
    others = [r for r in rows if r not in seeds or r is base]
    lines = [f"held-out MLM over all {len(rows)} runs: {held.mean():.4f} ± {held.std(ddof=1):.4f} (range "
             f"{held.min():.4f}–{held.max():.4f})" if len(rows) > 1 else ""]
    for label, group in (("seeds (base and seed=S)", seeds), ("numerics at seed 0 (base and the rest)", others)):
        if len(group) > 1:
            g = np.array([r["heldout_mlm_loss"] for r in group])
            lines.append(f"{label}: {g.mean():.4f} ± {g.std(ddof=1):.4f} over {len(group)} runs")
    if len(rows) > 2 and all(steps_below):
        x = np.array(steps_below, dtype=float)
        slope = np.polyfit(x, held, 1)[0]
        lines.append(f"held-out MLM against the step the train loss fell under {level}: Pearson r = "
                     f"{np.corrcoef(x, held)[0, 1]:.2f}, {100 * slope:+.3f} nats per 100 steps later")
    return "\n".join(out) + "\n\n" + "\n".join(x for x in lines if x) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="budget:2273")
    ap.add_argument("--variants", default="base,threads=1,isa=AVX512_CORE_BF16,portable,fp32,fp32+mkl=AVX2,"
                                          "seed=1,seed=2")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--points", default="", help="steps at which the table shows the train loss (default: 5 spread)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=ROOT / layout.PAIRS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--below", type=float, default=6.0,
                    help="the table's `step < L` column: when the 50-step train loss first fell under L")
    ap.add_argument("--rows", type=Path, default=None, help="redraw the table from a rows.jsonl (no training)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return Path()
    variants = a.variants.split(",")
    if variants[0] != "base":
        raise SystemExit("bench.numerics: --variants must start with base (the others are compared with it)")
    specs = [{**parse_variant(v), "variant": v, "recipe": a.recipe, "smoke": a.smoke, "data": a.data,
              "pairs": str(a.pairs)} for v in variants]
    from bench.time_to_quality import commit
    from bench.train import cpu_kind

    kind = cpu_kind(Path("/proc/cpuinfo").read_text())
    print(json.dumps({"bench": "numerics", "cpu_kind": kind, "recipe": a.recipe, "commit": commit()}), flush=True)
    if a.rows:
        rows = [json.loads(line) for line in a.rows.read_text().splitlines()]
    else:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            rows = list(pool.map(run_one, specs))
    steps = len(rows[0]["mlm"])
    points = [int(p) for p in a.points.split(",")] if a.points else \
        sorted({min(steps, s) for s in (WINDOW, steps // 8, steps // 4, steps // 2, steps)})
    out = a.out or (a.rows.parent if a.rows else ROOT / "bench/results" / f"{datetime.date.today()}-numerics-{commit()}")
    out.mkdir(parents=True, exist_ok=True)
    if not a.rows:
        (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (f"# {a.recipe}: the same recipe under other numerics ({datetime.date.today()})\n\n{kind}, "
            f"{os.cpu_count()} cores, commit {commit()}. `python -m bench.numerics --recipe {a.recipe} "
            f"--variants {a.variants} --jobs {a.jobs}`\n\n" + table(rows, points, a.below))
    (out / "table.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
