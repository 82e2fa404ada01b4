"""Benchmark of the data stages' compute: tokenize + pairs on full WikiText-2, in-process.

    python -m bench.data [--data DIR_OR_ZIP] [--repeat 3] [--reference]

Times what the tokenize and pairs stages compute (read + paragraph rule, vocabulary, id arrays,
NSP pairs and masks for train/valid/test), not interpreter start-up or file writes; prints the best
of `--repeat` runs and the peak RSS as JSON. `--reference` also runs d2l 1.0.3's own data preparation
(`../shared/bench/d2l_reference.py` with --steps 0 is not possible, so its `prep_s` is taken from a
1-step run) with the d2l venv from `../shared/bench/d2l-venv.sh`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from minibert.config import PairsConfig, VocabConfig
from minibert.data.corpus import SPLITS, read_paragraphs, split_file
from minibert.data.pairs import make_pairs
from minibert.data.vocab import build_vocab, encode_paragraphs

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def data_dir(src: str) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    out = Path(tempfile.mkdtemp(prefix="minibert-bench-"))
    with zipfile.ZipFile(path) as zf:
        for split in SPLITS:
            (out / f"wiki.{split}.tokens").write_bytes(zf.read(f"wikitext-2/wiki.{split}.tokens"))
    return out


def run_once(raw: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    paragraphs = {s: read_paragraphs(split_file(raw, s)) for s in SPLITS}
    vocab = build_vocab(paragraphs["train"], VocabConfig().min_freq)
    arrays = {s: encode_paragraphs(paragraphs[s], vocab) for s in SPLITS}
    t1 = time.perf_counter()
    cfg = PairsConfig()
    n = {s: len(make_pairs(arrays[s], cfg, len(vocab),
                           np.random.default_rng(cfg.seed if s == "train" else cfg.heldout_seed))["nsp_labels"])
         for s in SPLITS}
    t2 = time.perf_counter()
    return {"tokenize_s": t1 - t0, "pairs_s": t2 - t1, "total_s": t2 - t0, "vocab": len(vocab),
            "train_pairs": n["train"]}


def reference(raw: Path) -> dict:
    venv = Path(os.environ.get("D2L_VENV", "/tmp/d2l-venv"))
    subprocess.run(["bash", str(SHARED / "bench/d2l-venv.sh"), str(venv)], check=True)
    out = subprocess.run([str(venv / "bin/python"), str(SHARED / "bench/d2l_reference.py"), str(raw), "--steps", "1"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("MINIBERT_DATA", str(SHARED / "data/wikitext-2")))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference", action="store_true")
    a = ap.parse_args()
    raw = data_dir(a.data)
    runs = [run_once(raw) for _ in range(a.repeat)]
    best = min(runs, key=lambda r: r["total_s"])
    result = {"impl": "minibert", **{k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()},
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(result))
    if a.reference:
        ref = reference(raw)
        print(json.dumps({"impl": ref["impl"], "prep_s": ref["prep_s"], "examples": ref["examples"],
                          "vocab": ref["vocab"], "speedup": round(ref["prep_s"] / best["total_s"], 2)}))


if __name__ == "__main__":
    main()
