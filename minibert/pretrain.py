"""One pretraining run end to end: data in, model + metrics + MLflow run out, resumable.

Called by `stages/pretrain.py` on every process (one, or each rank under torch.distributed.run);
only rank 0 writes files and talks to MLflow.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from minibert import checkpoint, distributed, plots
from minibert.artifacts import atomic_path, sha256_file, write_json
from minibert.cpus import ThreadShare
from minibert.config import ModelConfig, TrackingConfig, TrainConfig
from minibert.errors import MinibertError
from minibert.heap import release_cpu_memory, tune_cpu_malloc
from minibert.model import Encoder, build_model, save_pretrained
from minibert.pairs import load_pairs
from minibert.progress import Progress
from minibert.tracking import NullTracker, start_run
from minibert.train import fit, make_optimizer, resolve_device, resolve_precision, to_tensors
from minibert.vocab import Vocab

# Settings that do not change the numbers: a run may resume across a change of these.
NOT_NUMERIC = ("log_every", "checkpoint_every", "rdzv_endpoint", "rdzv_id", "nodes", "devices")


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")
    pairs: Path = Path("data/pairs/train.safetensors")
    vocab: Path = Path("data/tokens/vocab.txt")
    models: Path = Path("models")
    metrics: Path = Path("metrics/train.json")
    curve_csv: Path = Path("plots/train_loss.csv")
    curve_png: Path = Path("plots/train_loss.png")
    checkpoints: Path = Path("checkpoints")
    params_file: Path | None = Path("params.yaml")


def run_fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_sha: str, vocab_sha: str, world: int) -> str:
    train = {k: v for k, v in asdict(cfg).items() if k not in NOT_NUMERIC}
    return checkpoint.fingerprint({"model": asdict(model_cfg), "train": train, "data": data_sha,
                                   "vocab": vocab_sha, "world": world})


def run_pretrain(model_cfg: ModelConfig, cfg: TrainConfig, tracking_cfg: TrackingConfig,
                 params: dict[str, Any], paths: Paths = Paths()) -> dict[str, Any]:
    """Train, write every pretrain output, return the metrics of `metrics/train.json`."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device, distributed.int_env("LOCAL_RANK"))
    threads = ThreadShare(cfg.threads, count_me=device.type == "cpu")
    threads.start()  # every CPU training counts, so `auto` ones share the cores with it
    if device.type == "cpu":
        tune_cpu_malloc()  # reuse the big per-step buffers instead of page-faulting them in every step
    d = distributed.init(device)
    try:
        pairs, vocab = load_pairs(paths.pairs)[0], Vocab.load(paths.vocab)
        data_sha = sha256_file(paths.pairs)
        ckpt_dir = paths.checkpoints / run_fingerprint(model_cfg, cfg, data_sha, vocab.sha256, d.world)
        model = build_model(model_cfg, len(vocab), seed=cfg.seed).to(device)
        opt = make_optimizer(model.parameters(), cfg, device)
        latest = checkpoint.latest(ckpt_dir)
        resumed = checkpoint.load(latest, model, opt) if latest else {}
        tracker = NullTracker()
        if d.is_main:
            tracker = start_run(tracking_cfg, paths.root, run_id=resumed.get("mlflow_run_id"))
            if not resumed:
                tracker.log_params(params)
            tracker.set_tags({"train_pairs_sha256": data_sha, "vocab_sha256": vocab.sha256,
                              "device": str(device)})  # start_run adds the git and DVC tags
            if latest:
                print(f"pretrain: resuming from {latest} (step {resumed['step']})", flush=True)
        logged = tracker.last_step("mlm_loss") or 0
        net = model
        if d.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)

        bar = Progress("pretrain", cfg.max_steps, "steps", start=resumed.get("step", 0), enabled=d.is_main)

        def on_log(rows):
            threads.refresh()  # `auto`: trainings may have started or ended since
            for r in rows:
                if r["step"] > logged:  # a resumed run re-trains steps already logged: skip them
                    tracker.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"])
            r = rows[-1]
            bar.update(r["step"], f"mlm {r['mlm_loss']:.3f}  nsp {r['nsp_loss']:.3f}  {r['pairs_per_sec']:.0f} pairs/s")

        def on_checkpoint(step, history):
            if d.is_main:
                return checkpoint.save(ckpt_dir, step, model, opt,
                                       {"history": history, "mlflow_run_id": tracker.run_id})
            return None

        if d.is_main:
            print(f"pretrain: training steps {resumed.get('step', 0) + 1}..{cfg.max_steps} on {device} "
                  f"x{d.world}", flush=True)
        try:
            result = fit(net, opt, cfg, to_tensors(pairs, device), device, d,
                         start_step=resumed.get("step", 0), history=resumed.get("history"),
                         on_log=on_log, on_checkpoint=on_checkpoint)
        except (MinibertError, KeyboardInterrupt):
            tracker.close("KILLED")
            raise
        if not d.is_main:
            return {}
        opt.zero_grad(set_to_none=True)  # training's gradients and heap pages are not needed any more
        if device.type == "cpu":
            release_cpu_memory()
        hist = result.history
        amp = resolve_precision(cfg.precision, device)
        metrics = {
            "mlm_loss": hist[-1]["mlm_loss"], "nsp_loss": hist[-1]["nsp_loss"],
            "mlm_loss_avg": sum(r["mlm_loss"] for r in hist) / len(hist),
            "nsp_loss_avg": sum(r["nsp_loss"] for r in hist) / len(hist),
            "pairs_per_sec": result.pairs / result.train_s if result.train_s else 0.0,
            "tokens_per_sec": result.tokens / result.train_s if result.train_s else 0.0,
            "wall_s": time.perf_counter() - t_start, "steps": len(hist), "device": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "fp32", "world_size": d.world,
            "mlflow_run_id": tracker.run_id or "",
        }
        metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        write_outputs(model, hist, metrics, vocab, data_sha, paths)
        tracker.log_metrics({f"final_{k}": metrics[k] for k in ("mlm_loss_avg", "nsp_loss_avg",
                                                                  "pairs_per_sec", "tokens_per_sec")})
        for f in (paths.models / "bert.safetensors", paths.models / "bert.json", paths.vocab):
            tracker.log_artifact(f, "weights")  # enough to rebuild the encoder: `minibert encode --run ID`
        tracker.log_model(Encoder(model).cpu(), example=encoder_example(pairs),
                          pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
        for f in (paths.curve_csv, paths.curve_png, paths.metrics, paths.params_file):
            if f is not None and f.is_file():
                tracker.log_artifact(f)
        tracker.close()
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # complete: nothing left to resume
        return metrics
    finally:
        threads.close()
        distributed.shutdown()


def encoder_example(pairs: dict) -> dict:
    """Two real train pairs, trimmed to their longest: the input example of the logged encoder."""
    t = int(pairs["valid_lens"][:2].max())
    return {"tokens": pairs["token_ids"][:2, :t].astype("int64"), "segments": pairs["segments"][:2, :t].astype("int64"),
            "valid_lens": pairs["valid_lens"][:2].astype("int64")}


def write_outputs(model, history, metrics, vocab: Vocab, data_sha: str, paths: Paths) -> None:
    save_pretrained(model, paths.models, {"vocab_sha256": vocab.sha256, "step": metrics["steps"],
                                          "train_pairs_sha256": data_sha, "mlflow_run_id": metrics["mlflow_run_id"]})
    with atomic_path(paths.curve_csv) as tmp:
        pd.DataFrame(history, columns=["step", "mlm_loss", "nsp_loss", "pairs_per_sec"]).to_csv(tmp, index=False)
    plots.loss_curves(history, paths.curve_png)
    write_json(paths.metrics, metrics)
