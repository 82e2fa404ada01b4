"""Scaling of the data stages: tokens/s and peak RSS at 1x, 10x, 50x WikiText-2, plus pretrain's RSS.

    python -m bench.scaling [--sizes 1,10,50] [--data DIR_OR_ZIP] [--work DIR] [--steps 4] [--keep]

For each size k it writes a synthetic train file of k copies of WikiText-2's train lines, each copy
in its own seeded shuffled order (paragraphs, headings and blank lines move as whole lines: no
copy repeats the file verbatim, and the vocabulary stays WikiText-2's), with the real valid and test
files beside it. Then it runs the real stages as subprocesses — `stages.tokenize`, `stages.pairs`,
and `stages.pretrain` for `--steps` steps (tracking off, no checkpoints) — and samples every 50 ms
each stage's process tree (the parent and its pool workers) from /proc/<pid>/smaps_rollup.
`peak_pss_mb` is the peak of the tree's summed PSS (proportional set size: a page shared by the
forked workers counts once in total, so this is the tree's real RAM); `peak_anon_mb` its anonymous
part (not reclaimable page cache); `max_rss_mb` the largest single process's RSS. pretrain's train
pairs are memory-mapped: its file-backed pages grow with the pages the batches touch (page cache
the kernel can drop), its anonymous memory should not grow with the corpus.
`--project DIR` runs another checkout's stages (e.g. `git archive main`) on the same corpora: the
before/after comparison under the same machine load.
Prints one JSON line per stage and size, then a markdown table. Everything is written under `--work`
(default: a temp folder, deleted unless `--keep`); the 50x corpus needs ~4 GB of disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from bench.data import SHARED, data_dir
from minibert import layout
from minibert.data.corpus import SPLITS, split_file

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(src: Path, raw: Path, k: int, seed: int = 0) -> None:
    """raw/wiki.train.tokens: k seeded shuffles of the real train lines, streamed to disk."""
    raw.mkdir(parents=True, exist_ok=True)
    lines = split_file(src, "train").read_bytes().splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    with open(split_file(raw, "train"), "wb") as f:
        for _ in range(k):
            for i in rng.permutation(len(lines)):
                f.write(lines[i])
    for split in SPLITS[1:]:
        shutil.copyfile(split_file(src, split), split_file(raw, split))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
                out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


def run(cmd: list[str], cwd: Path, project: Path = ROOT) -> dict[str, float]:
    """Run a stage; wall seconds and the peaks of its process tree's summed PSS (all, anonymous,
    file-backed) and of its largest single RSS."""
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            stats = [_status(p) for p in _tree(proc.pid)]
            for k in ("Pss", "Pss_Anon", "Pss_File"):
                peak[k] = max(peak[k], sum(s.get(k, 0) for s in stats))
            peak["Rss"] = max([peak["Rss"]] + [s.get("Rss", 0) for s in stats])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"s": round(wall, 2), "peak_pss_mb": mb(peak["Pss"]), "peak_anon_mb": mb(peak["Pss_Anon"]),
            "peak_file_mb": mb(peak["Pss_File"]), "max_rss_mb": mb(peak["Rss"]), "log": out.strip().splitlines()[-1]}


def one_size(src: Path, work: Path, k: int, steps: int, workers: int, project: Path, reuse: bool) -> list[dict]:
    w = work / f"x{k}"
    if not (w / "raw").is_dir():
        build_corpus(src, w / "raw", k)
    for out in (layout.MODELS, layout.PLOTS) if reuse else ("tokens", "pairs", layout.METRICS, layout.MODELS, layout.PLOTS):
        shutil.rmtree(w / out, ignore_errors=True)
    params = yaml.safe_load((project / layout.PARAMS).read_text())
    if "workers" in params["data"]:
        params["data"]["workers"] = workers
    params["train"].update({"max_steps": max(steps, 1), "checkpoint_every": 0, "device": "cpu"})
    params["tracking"]["enabled"] = False
    (w / layout.PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
    py = [sys.executable, "-m"]
    rows = []
    tok = None
    if not (reuse and (w / "tokens").is_dir()):
        tok = run(py + ["stages.tokenize", "--raw", "raw", "--out", "tokens", "--metrics", str(layout.METRICS)], w, project)
    corpus = json.loads((w / layout.METRICS / "corpus.json").read_text())
    n_tok = sum(corpus[f"{s}_tokens"] for s in SPLITS)
    if tok:
        rows.append({"stage": "tokenize", "size": k, "tokens": n_tok, "tokens_per_s": round(n_tok / tok["s"]), **tok})
    if not (reuse and (w / "pairs").is_dir()):
        pairs = run(py + ["stages.pairs", "--tokens", "tokens", "--out", "pairs", "--metrics", str(layout.METRICS)], w, project)
        rows.append({"stage": "pairs", "size": k, "tokens": n_tok, "tokens_per_s": round(n_tok / pairs["s"]), **pairs})
    if not steps:
        return rows
    pre = run(py + ["stages.pretrain", "--pairs", "pairs/train.safetensors", "--vocab", "tokens/vocab.txt"], w, project)
    n_pairs = json.loads((w / layout.METRICS / "pairs.json").read_text())["train_pairs"]
    rows.append({"stage": f"pretrain ({steps} steps)", "size": k, "tokens": n_tok, "train_pairs": n_pairs,
                 "tokens_per_s": None, **pre})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--data", default=os.environ.get("MINIBERT_DATA", str(SHARED / "data/wikitext-2")))
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="data.workers (0: every usable core)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep tokens/pairs already under --work (rerun pretrain)")
    ap.add_argument("--project", default=str(ROOT), help="checkout whose stages run (default: this one)")
    a = ap.parse_args()
    src = data_dir(a.data)
    work = Path(a.work or tempfile.mkdtemp(prefix="minibert-scaling-"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(json.dumps({"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg()}), flush=True)
    rows = []
    try:
        for k in map(int, a.sizes.split(",")):
            for row in one_size(src, work, k, a.steps, a.workers, Path(a.project), a.reuse):
                print(json.dumps(row), flush=True)
                rows.append(row)
            if not a.keep:
                shutil.rmtree(work / f"x{k}")
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| stage | size | tokens | s | tokens/s | peak PSS MB (tree) | of it anon MB | largest RSS MB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['tokens_per_s'] / 1e6:.2f}M" if r["tokens_per_s"] else "-"
        print(f"| {r['stage']} | {r['size']}x | {r['tokens'] / 1e6:.1f}M | {r['s']} | {rate} | {r['peak_pss_mb']} | "
              f"{r['peak_anon_mb']} | {r['max_rss_mb']} |")


if __name__ == "__main__":
    main()
