"""A tiny but real minibert workspace for stage-level tests: synthetic pairs, a small vocab, params."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from minibert.artifacts import save_arrays
from minibert.config import PairsConfig
from minibert.data.pairs import make_pairs
from minibert.data.vocab import SPECIALS, Vocab

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_layers": 1, "hidden": 12, "heads": 3, "ffn_hidden": 37, "dropout": 0.1, "max_len": 29}


def pretrain_run(root: Path, experiment: str) -> str:
    """What the pretrain stage leaves behind for evaluate and probe: an MLflow run in `root`'s store and
    its id in metrics/train.json. Returns the run id."""
    import json

    from minibert.config import TrackingConfig
    from minibert.tracking.runs import start_run

    with start_run(TrackingConfig(experiment=experiment), root) as tracker:
        run_id = tracker.run_id
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/train.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    return run_id


def synthetic_split(rng, n_para=99, vocab_size=99, max_sent=13):
    n_sent = rng.integers(2, 8, n_para)
    lens = rng.integers(1, max_sent + 1, n_sent.sum())
    return {"ids": rng.integers(len(SPECIALS), vocab_size, lens.sum()).astype(np.int32),
            "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}


def make_workspace(root: Path, train: dict | None = None, model: dict | None = None, seed: int = 7,
                   tracking: bool = False, n_para: int = 99) -> Path:
    """Write data/tokens/vocab.txt, data/pairs/{train,valid}.safetensors and params.yaml under `root`."""
    vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(99 - len(SPECIALS))))
    (root / "data/tokens").mkdir(parents=True, exist_ok=True)
    vocab.save(root / "data/tokens/vocab.txt")
    cfg = PairsConfig(max_len=29)
    for split, s in (("train", seed), ("valid", seed + 1)):
        pairs = make_pairs(synthetic_split(np.random.default_rng(s), n_para), cfg, len(vocab),
                           np.random.default_rng(s))
        save_arrays(root / f"data/pairs/{split}.safetensors", pairs, {"vocab_sha256": vocab.sha256})
    params = {"pairs": {"max_len": 29},
              "model": {**TINY_MODEL, **(model or {})},
              "train": {"batch_size": 16, "max_steps": 12, "log_every": 1, "checkpoint_every": 4,
                        "device": "cpu", "threads": 1, **(train or {})},
              "tracking": {"enabled": tracking, "experiment": "tiny"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage(root: Path, name: str, *args: str, check: bool = True, timeout: float | None = None
          ) -> subprocess.CompletedProcess:
    """Run `python -m stages.<name>` in `root` with the project importable. Past `timeout` seconds the
    stage and every process below it are killed (a multi-rank stage's torchrun and ranks, which would
    otherwise keep running under the rest of the suite) and the error shows what it had printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", "params.yaml", *args]
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [child.pid, *descendants(child.pid)]:  # torchrun starts each rank in its own session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = child.communicate()
        raise AssertionError(f"stages.{name} did not finish within {timeout} s; it and its children were killed. "
                             f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"stages.{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # fields[1]: the parent pid
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def popen_stage(root: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--params", "params.yaml"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tiny_batch(valid_lens: list[int], n_real_slots: list[int], T: int = 13, P: int = 3, V: int = 99):
    """One padded batch as torch tensors: (tokens, segments, valid, positions, weights, labels, nsp).
    Uses the global torch RNG: seed it first."""
    import torch

    valid = torch.tensor(valid_lens)
    B = len(valid_lens)
    tokens = torch.randint(5, V, (B, T)) * (torch.arange(T) < valid[:, None])
    segments = (torch.arange(T) >= (valid // 2)[:, None]).long()
    positions = torch.stack([torch.randperm(int(v) - 1)[:P] + 1 for v in valid])
    weights = (torch.arange(P) < torch.tensor(n_real_slots)[:, None]).float()
    return tokens, segments, valid, positions, weights, torch.randint(5, V, (B, P)), torch.randint(0, 2, (B,))


def tiny_fit(train: dict, out: Path | None = None):
    """`minibert.training.train.train_model` in this process on tiny synthetic pairs (dropout 0, plain SGD so that float
    noise is not rescaled the way Adam rescales it); joins the process group when the launcher's
    environment variables are set. Rank 0 saves the weights to `out`; returns (model, history)."""
    import torch
    from safetensors.torch import save_file

    from minibert.config import ModelConfig, TrainConfig
    from minibert.training import distributed
    from minibert.training.train import train_model

    cfg = TrainConfig(**{"device": "cpu", "checkpoint_every": 0, "threads": 1, **train})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pairs = make_pairs(synthetic_split(np.random.default_rng(13), n_para=13), PairsConfig(max_len=29), 99,
                       np.random.default_rng(13))
    d = distributed.init(torch.device("cpu"))
    try:
        model, result = train_model(ModelConfig(**{**TINY_MODEL, "dropout": 0.0}), cfg, pairs, 99, device="cpu", dist=d,
                                    optimizer=lambda params, c: torch.optim.SGD(params, lr=c.lr))
        hist = result.history
        if out is not None and d.is_main:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
        return model, hist
    finally:
        distributed.shutdown()
        torch.set_num_threads(threads)


def ddp_rank(rank: int, world: int, port: int, train: dict, out: Path) -> None:
    """One gloo rank of `tiny_fit`, started by torch.multiprocessing.spawn (the launcher's environment)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    tiny_fit(train, out)
