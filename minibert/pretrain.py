"""One pretraining run end to end: data in, model + metrics + MLflow run out, resumable.

Called by `stages/pretrain.py` on every process (one, or each rank under torch.distributed.run);
only rank 0 writes files and talks to MLflow.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from minibert import checkpoint, distributed, layout, plots
from minibert.artifacts import atomic_path, sha256_file, write_json
from minibert.batches import resolve_device, to_tensors
from minibert.cpus import ThreadShare
from minibert.config import EvalConfig, ModelConfig, TrackingConfig, TrainConfig
from minibert.describe import DIFF_TAG, NOTE_TAG, describe_run
from minibert.errors import Interrupted
from minibert.evaluate import CURVE, heldout_batch_size, heldout_hook, heldout_subset
from minibert.heap import release_cpu_memory, tune_cpu_malloc
from minibert.model import Encoder, build_model, check_vocab, save_pretrained
from minibert.pairs import load_pairs
from minibert.progress import Progress
from minibert.shards import release
from minibert.tracking import NullTracker, log_text_model, register_version, start_run
from minibert.train import fit, make_optimizer, resolve_precision
from minibert.vocab import Vocab

@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")
    pairs: Path = layout.TRAIN_PAIRS
    vocab: Path = layout.VOCAB
    models: Path = layout.MODELS
    metrics: Path = layout.TRAIN_METRICS
    curve_csv: Path = layout.TRAIN_CURVE_CSV
    curve_png: Path = layout.TRAIN_CURVE_PNG
    checkpoints: Path = layout.CHECKPOINTS
    params_file: Path | None = layout.PARAMS
    valid_pairs: Path = layout.VALID_PAIRS
    valid_curve: Path = layout.VALID_CURVE_CSV


def run_fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_sha: str, vocab_sha: str, world: int) -> str:
    """Hash of everything that changes the numbers: train fields not marked `config.NOT_NUMERIC`, and more."""
    train = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("numeric", True)}
    return checkpoint.fingerprint({"model": asdict(model_cfg), "train": train, "data": data_sha,
                                   "vocab": vocab_sha, "world": world})


def run_pretrain(model_cfg: ModelConfig, cfg: TrainConfig, tracking_cfg: TrackingConfig,
                 params: dict[str, Any], paths: Paths = Paths(), eval_cfg: EvalConfig = EvalConfig(),
                 run_name: str | None = None) -> dict[str, Any]:
    """Train, write every pretrain output, return the metrics of `metrics/train.json`.

    With `train.eval_every` > 0, rank 0 scores `eval_cfg.subset_pairs` fixed valid pairs on the way
    (the held-out curve: `valid_*` per step in MLflow and `paths.valid_curve`). `run_name` heads the
    loss plot's title."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device, distributed.int_env("LOCAL_RANK"))
    threads = ThreadShare(cfg.threads, count_me=device.type == "cpu")
    threads.start()  # every CPU training counts, so `auto` ones share the cores with it
    if device.type == "cpu":
        tune_cpu_malloc()  # reuse the big per-step buffers instead of page-faulting them in every step
    d = distributed.init(device)
    tracker = NullTracker()
    clean = False
    try:
        pairs, vocab = load_pairs(paths.pairs)[0], Vocab.load(paths.vocab)
        data_sha = sha256_file(paths.pairs)
        heldout = None
        if cfg.eval_every and d.is_main:
            valid, valid_meta = load_pairs(paths.valid_pairs)
            check_vocab({"vocab_sha256": vocab.sha256}, valid_meta.get("vocab_sha256"), paths.valid_pairs)
            heldout = heldout_subset(valid, eval_cfg.subset_pairs)
        ckpt_dir = paths.checkpoints / run_fingerprint(model_cfg, cfg, data_sha, vocab.sha256, d.world)
        model = build_model(model_cfg, len(vocab), seed=cfg.seed).to(device)
        opt = make_optimizer(model.parameters(), cfg)
        latest, damaged = checkpoint.latest(ckpt_dir)
        resumed = checkpoint.load(latest, model, opt) if latest else {}
        if d.is_main:
            tracker = start_run(tracking_cfg, paths.root, run_id=resumed.get("mlflow_run_id"),
                                params=params, params_file=paths.params_file)  # a new run logs params
            tracker.set_tags({"train_pairs_sha256": data_sha, "vocab_sha256": vocab.sha256,
                              "device": str(device)})  # start_run adds the git and DVC tags
            for line in damaged:
                print(f"warning: pretrain: {line}", file=sys.stderr, flush=True)
            if latest:
                print(f"pretrain: resuming from {latest} (step {resumed['step']})", flush=True)
        logged = tracker.last_step("mlm_loss") or 0

        def log_new(rows):  # a resumed run re-trains steps already logged: skip them
            for r in rows:
                if r["step"] > logged:
                    tracker.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"])

        # Steps the checkpoint holds that MLflow never stored: metrics go out from a background sender,
        # so a kill -9 can lose the last points it had queued. The checkpoint's history has them.
        log_new(resumed.get("history") or [])
        logged = max(logged, resumed.get("step", 0))
        net = model
        if d.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)

        bar = Progress("pretrain", cfg.max_steps, "steps", start=resumed.get("step", 0), enabled=d.is_main)

        def on_log(rows):
            threads.refresh()  # `auto`: trainings may have started or ended since
            log_new(rows)
            r = rows[-1]
            held = f"  valid mlm {r['valid_mlm_loss']:.3f}" if "valid_mlm_loss" in r else ""
            bar.update(r["step"], f"mlm {r['mlm_loss']:.3f}  nsp {r['nsp_loss']:.3f}{held}  {r['pairs_per_sec']:.0f} pairs/s")
            release(pairs)  # the mapped rows these steps touched leave RSS (page cache keeps them)

        def on_checkpoint(step, history, scaler_state):
            if d.is_main:
                return checkpoint.save(ckpt_dir, step, model, opt,
                                       {"history": history, "mlflow_run_id": tracker.run_id}, scaler_state)
            return None

        if d.is_main:
            print(f"pretrain: training steps {resumed.get('step', 0) + 1}..{cfg.max_steps} on {device} "
                  f"x{d.world}", flush=True)
        # the bare model, not `net`: only rank 0 evaluates, and DDP's forward could wait for the others.
        batch = heldout_batch_size(eval_cfg.batch_size, cfg.batch_size, cfg.micro_batches, d.world)
        on_eval = heldout_hook(model, heldout, batch, device) if heldout else None
        result = fit(net, opt, cfg, to_tensors(pairs, device), device, d,
                     start_step=resumed.get("step", 0), history=resumed.get("history"),
                     on_log=on_log, on_checkpoint=on_checkpoint, scaler_state=resumed.get("scaler"),
                     on_eval=on_eval, vocab_size=len(vocab))
        if not d.is_main:
            clean = True
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
        if run_name is None:  # the MLflow run's own name and what differs, tracked or not
            name, tags = describe_run(params, paths.params_file, paths.root)
            diff = tags.get(DIFF_TAG)
            run_name = name if not diff or diff == name else f"{name} ({diff})"
        write_outputs(model, hist, metrics, vocab, data_sha, paths,
                      plots.run_title(run_name, asdict(model_cfg), asdict(cfg)))
        tracker.log_metrics({f"final_{k}": metrics[k] for k in ("mlm_loss_avg", "nsp_loss_avg",
                                                                  "pairs_per_sec", "tokens_per_sec", "wall_s")})
        if resumed.get("mlflow_run_id") is None:  # a run this process named: add what only the end knows
            tracker.set_tags(wall_tags(params, paths, metrics["wall_s"], result.train_s))
        for f in (paths.models / "bert.safetensors", paths.models / "bert.json", paths.vocab):
            tracker.log_artifact(f, "weights")  # enough to rebuild the encoder: `minibert encode --run ID`
        tracker.log_model(Encoder(model).cpu(), example=encoder_example(pairs),
                          pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
        # Text in, vectors out (mlflow models serve), registered as a new version of tracking.registered_model.
        register_version(tracker, tracking_cfg.registered_model, log_text_model(tracker, paths.models, paths.vocab),
                         {"train_pairs_sha256": data_sha, "vocab_sha256": vocab.sha256})
        for f in (paths.curve_csv, paths.curve_png, paths.valid_curve, paths.metrics, paths.params_file):
            if f is not None and f.is_file():
                tracker.log_artifact(f)
        tracker.close()
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # complete: nothing left to resume
        clean = True
        return metrics
    except BaseException as e:  # anything at all: never leave the MLflow run RUNNING
        tracker.close(run_status(e))
        raise
    finally:
        threads.close()
        distributed.shutdown(clean)


def wall_tags(params: dict[str, Any], paths: Paths, wall_s: float, train_s: float) -> dict[str, str]:
    """The run's description with its wall time appended, and a budget run's name with it (describe.py)."""
    name, tags = describe_run(params, paths.params_file, paths.root, wall_s)
    out = {NOTE_TAG: f"{tags[NOTE_TAG]}; trained in {wall_s:.0f} s wall ({train_s:.0f} s in steps)"}
    if params.get("train.budget_minutes"):
        out["mlflow.runName"] = name
    return out


def run_status(e: BaseException) -> str:
    """MLflow's end state for a run stopped by `e`: KILLED when asked to stop, FAILED otherwise (NaN too)."""
    return "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED"


def encoder_example(pairs: dict) -> dict:
    """Two real train pairs, trimmed to their longest: the input example of the logged encoder."""
    t = int(pairs["valid_lens"][:2].max())
    return {"tokens": pairs["token_ids"][:2, :t].astype("int64"), "segments": pairs["segments"][:2, :t].astype("int64"),
            "valid_lens": pairs["valid_lens"][:2].astype("int64")}


def write_outputs(model, history, metrics, vocab: Vocab, data_sha: str, paths: Paths,
                  title: str = "minibert pretraining") -> None:
    save_pretrained(model, paths.models, {"vocab_sha256": vocab.sha256, "step": metrics["steps"],
                                          "train_pairs_sha256": data_sha, "mlflow_run_id": metrics["mlflow_run_id"]})
    with atomic_path(paths.curve_csv) as tmp:
        pd.DataFrame(history, columns=["step", "mlm_loss", "nsp_loss", "pairs_per_sec"]).to_csv(tmp, index=False)
    heldout = [r for r in history if "valid_mlm_loss" in r]  # header only when eval_every is 0
    with atomic_path(paths.valid_curve) as tmp:
        pd.DataFrame(heldout, columns=["step", *(f"valid_{k}" for k in CURVE), "valid_wall_s"]).to_csv(tmp, index=False)
    plots.loss_curves(history, paths.curve_png, title, vocab_size=len(vocab), max_steps=history[-1]["step"])
    write_json(paths.metrics, metrics)
