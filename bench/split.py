"""Micro-batches of similar-length pairs against interleaved ones: whole training steps, one process.

    python -m bench.split [--batches 6] [--rounds 8] [--micro-batches 4] [--precision auto] [--data PATH]

`minibert.data.batches.split_batch` sorts a batch by valid length and cuts it into runs, each trimmed to its
longest pair; before, micro-batch j held rows j, j + K, ... and every one was as long as the batch's
longest pair (~64). The lever saves a few per cent of a step, less than the shared machine's swings
between processes (bench.ab's per-round ratios spread 0.73-1.14 on 2026-12-03), so here both splits
run alternately in one process on the same `--batches` real WikiText-2 batches (fit's order), each
keeping per batch its fastest of `--rounds` steps. Prints one JSON line per split (ms a step, the
micro-batches' padded widths T of each batch, the padded attention area sum(b * T^2) against
interleaved) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import minibert.training.loop as mt
from bench.common import DEFAULT_DATA, load_splits
from minibert import layout
from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import batch_indices, gather_batch, split_batch, to_tensors
from minibert.model.bert import build_model
from minibert.training.heap import tune_cpu_malloc


def interleaved_split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """The split before the lever: rows j, j + parts, ... (each trimmed to its longest pair)."""
    n = len(batch["nsp_labels"])
    return [gather_batch(batch, np.arange(j, n, parts)) for j in range(min(parts, n))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 folder or zip (pairs built in-process)")
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS, help="pipeline pairs folder, used if present")
    a = ap.parse_args()
    if min(a.batches, a.rounds, a.micro_batches) < 1:
        raise SystemExit("bench.split: --batches, --rounds and --micro-batches must be >= 1")
    tune_cpu_malloc()
    cpu = torch.device("cpu")
    dtype = mt.resolve_precision(a.precision, cpu)
    splits, vocab, source = load_splits(("train",), a.data, a.pairs)
    data = to_tensors(splits["train"], cpu)
    n = len(splits["train"]["nsp_labels"])
    batches = [gather_batch(data, batch_indices(s, n, 512, 0)) for s in range(a.batches)]
    model = build_model(ModelConfig(), vocab, 0).train()
    opt = mt.make_optimizer(model.parameters(), TrainConfig())
    variants = {"interleaved": interleaved_split, "sorted": split_batch}
    best = {k: [float("inf")] * a.batches for k in variants}
    print(f"{n} train pairs ({source}); {a.batches} batches x {a.rounds} rounds, {dtype or 'fp32'}, "
          f"{a.micro_batches} micro-batches", file=sys.stderr)
    try:
        for _ in range(a.rounds):
            for name, split in variants.items():
                mt.split_batch = split  # train_step looks the split up in its module (loop) at call time
                for i, b in enumerate(batches):
                    torch.manual_seed(i)
                    t0 = time.perf_counter()
                    mlm, _ = mt.train_step(model, opt, None, b, 1.0, 1.0, dtype, cpu, a.micro_batches)
                    float(mlm)
                    best[name][i] = min(best[name][i], time.perf_counter() - t0)
    finally:
        mt.split_batch = variants["sorted"]
    area = {}
    for name, split in variants.items():
        parts = [split(b, a.micro_batches) for b in batches]
        widths = [[p["token_ids"].shape[1] for p in ps] for ps in parts]
        area[name] = sum(len(p["nsp_labels"]) * p["token_ids"].shape[1] ** 2 for ps in parts for p in ps)
        print(json.dumps({"bench": "split", "split": name, "ms_step": round(sum(best[name]) / a.batches * 1e3, 1),
                          "widths": widths, "attention_area_vs_interleaved": round(area[name] / area["interleaved"], 3)}))
    print(json.dumps({"bench": "split_summary", "sorted_vs_interleaved": round(sum(best["sorted"]) /
                                                                               sum(best["interleaved"]), 3)}))


if __name__ == "__main__":
    main()
