"""The pretrain stage's step rate while its MLflow server is down, against the same run with it up.

    python -m bench.outage [--steps 20] [--rounds 2] [--skip 5] [--code DIR] [--data PATH]

Builds a workspace with the real WikiText-2 train pairs and default params (max_steps = --steps,
no checkpoints, tracking on), starts a real `mlflow server` on 127.0.0.1, and runs
`python -m stages.pretrain` --rounds times in each mode, interleaved (normal, outage, normal, ...) so
load elsewhere on the machine hits both alike. `outage`: the server is SIGKILLed one second after
training starts and stays down to the end (close() then gives up after its bound). The step rate is
the median pairs/s of the curve's steps after --skip (plots/train_loss.csv), so both modes compare
the same steps. `--code DIR` runs another checkout's stage (e.g. main, for a before figure).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.common import DEFAULT_DATA
from bench.data import data_dir
from minibert import layout
from minibert.artifacts import save_arrays
from minibert.config import PairsConfig, VocabConfig
from minibert.data.corpus import read_paragraphs, split_file
from minibert.data.pairs import make_pairs
from minibert.data.vocab import build_vocab, encode_paragraphs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mlflow_server import start_mlflow_server, stop_mlflow_server  # noqa: E402  (the tests' real-server helper)


def workspace(root: Path, data: str, steps: int) -> None:
    """data/tokens/vocab.txt, data/pairs/{train,valid}.safetensors (the stage's held-out curve reads the
    valid pairs) and params.yaml as the pipeline would write them."""
    raw = data_dir(data)
    paragraphs = read_paragraphs(split_file(raw, "train"))
    vocab = build_vocab(paragraphs, VocabConfig().min_freq)
    (root / layout.TOKENS).mkdir(parents=True)
    vocab.save(root / layout.VOCAB)
    cfg = PairsConfig()
    for split, path, seed in (("train", layout.TRAIN_PAIRS, cfg.seed), ("valid", layout.VALID_PAIRS, cfg.heldout_seed)):
        split_paragraphs = paragraphs if split == "train" else read_paragraphs(split_file(raw, split))
        pairs = make_pairs(encode_paragraphs(split_paragraphs, vocab), cfg, len(vocab), np.random.default_rng(seed))
        save_arrays(root / path, pairs, {"vocab_sha256": vocab.sha256})  # seeds as stages/pairs.py
    params = yaml.safe_load((ROOT / layout.PARAMS).read_text())
    params["train"].update(max_steps=steps, checkpoint_every=0)
    params["tracking"].update(enabled=True, experiment="bench-outage")
    (root / layout.PARAMS).write_text(yaml.safe_dump(params))


def run_stage(root: Path, code: Path, uri: str, kill=None) -> dict:
    for out in (layout.MODELS, layout.METRICS, layout.PLOTS):
        subprocess.run(["rm", "-rf", str(root / out)], check=True)
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t_train = None
    for line in proc.stdout:
        if "pretrain: training steps" in line:
            t_train = time.perf_counter()
            if kill:
                time.sleep(1.0)
                kill()
            break
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"bench.outage: the stage failed:\n{err[-2000:]}")
    curve = pd.read_csv(root / layout.TRAIN_CURVE_CSV)
    return {"curve": curve, "wall_s": wall, "after_train_s": wall - (t_train - t0), "stderr": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the rate (warm-up, the kill)")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose stages.pretrain runs")
    ap.add_argument("--data", default=DEFAULT_DATA)
    a = ap.parse_args()
    rates: dict[str, list[float]] = {"normal": [], "outage": []}
    walls: dict[str, list[float]] = {"normal": [], "outage": []}
    with tempfile.TemporaryDirectory(prefix="minibert-outage-") as tmp:
        ws, srv = Path(tmp) / "ws", Path(tmp) / "srv"
        srv.mkdir()
        workspace(ws, a.data, a.steps)
        for r in range(a.rounds):
            for mode in ("normal", "outage"):
                uri, proc = start_mlflow_server(srv)
                try:
                    res = run_stage(ws, a.code, uri, kill=(lambda: stop_mlflow_server(proc, signal.SIGKILL))
                                    if mode == "outage" else None)
                finally:
                    stop_mlflow_server(proc)
                if mode == "outage" and "not answering" not in res["stderr"]:
                    raise SystemExit("bench.outage: the stage never noticed the outage (run longer: --steps)")
                rate = float(res["curve"]["pairs_per_sec"].iloc[a.skip:].median())
                rates[mode].append(rate)
                walls[mode].append(res["wall_s"])
                print(json.dumps({"round": r, "mode": mode, "pairs_per_s_median": round(rate, 1),
                                  "stage_wall_s": round(res["wall_s"], 1),
                                  "after_training_start_s": round(res["after_train_s"], 1)}), flush=True)
    normal, outage = statistics.median(rates["normal"]), statistics.median(rates["outage"])
    print(json.dumps({"bench": "outage", "code": str(a.code), "steps": a.steps, "rounds": a.rounds,
                      "normal_pairs_per_s": round(normal, 1), "outage_pairs_per_s": round(outage, 1),
                      "ratio": round(outage / normal, 3), "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
