"""One pretraining run end to end: data in, model + metrics + MLflow run out, resumable.

`run_pretrain` reads as the run goes: `start_process` (device, threads, process group), `set_up` (data,
model, optimizer, checkpoint, MLflow run), `train` (the loop), `finish` (files, the run's own metrics and
artifacts). Publishing the model (the logged encoder, the served text model, the registry) is the
publish stage's (`minibert.tracking.publish`): nothing here imports it, so editing it never retrains.

Called by `stages/pretrain.py` on every process (one, or each rank under torch.distributed.run);
only rank 0 writes files and talks to MLflow.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from minibert import layout, plots
from minibert.artifacts import all_or_nothing, atomic_path, sha256_file, write_json
from minibert.config import EvalConfig, ModelConfig, TrackingConfig, TrainConfig
from minibert.data.batches import to_tensors
from minibert.data.pairs import load_pairs
from minibert.data.shards import drop_mapped_pages
from minibert.data.vocab import Vocab
from minibert.device import resolve_device
from minibert.errors import Interrupted, WriteError
from minibert.evaluation.heldout import heldout_batch_size, heldout_hook, heldout_subset
from minibert.model.bert import build_model, check_vocab, save_pretrained
from minibert.progress import Progress
from minibert.tracking.lineage import DataInput, log_data_inputs
from minibert.tracking.runinfo import DIFF_TAG, NOTE_TAG, describe_run
from minibert.tracking.runs import start_run
from minibert.tracking.system_metrics import SystemSampler
from minibert.tracking.tracker import NullTracker, Tracker
from minibert.training import checkpoint, distributed
from minibert.training.cpus import ThreadShare
from minibert.training.heap import release_cpu_memory, tune_cpu_malloc
from minibert.training.live_plots import TRAIN_COLUMNS, VALID_COLUMNS, LiveCurves
from minibert.training.loop import fit, make_optimizer, resolve_micro_batches, resolve_precision


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
    """Train, write every pretrain output, return the metrics of `metrics/train.json` ({} off rank 0).

    With `train.eval_every` > 0, rank 0 scores `eval_cfg.subset_pairs` fixed valid pairs on the way
    (the held-out curve: `valid_*` per step in MLflow and `paths.valid_curve`). `run_name` heads the
    loss plot's title."""
    t_start = time.perf_counter()
    run = start_process(cfg)
    clean = False
    try:
        set_up(run, model_cfg, cfg, tracking_cfg, eval_cfg, params, paths)
        result = train(run, cfg, eval_cfg)
        metrics = finish(run, result, model_cfg, cfg, params, paths, run_name, t_start)
        clean = True
        return metrics
    except BaseException as e:  # anything at all: never leave the MLflow run RUNNING
        run.sampler.stop()
        if run.live is not None:  # the live plot CSVs go back to the last good run's, like every output
            run.live.restore()
        run.tracker.close(run_status(e))
        raise
    finally:
        run.threads.close()
        distributed.shutdown(clean)


@dataclass
class Run:
    """One process's share of a pretraining run: made by `start_process` and `set_up`, used by `train`
    and `finish`."""
    device: torch.device
    threads: ThreadShare
    ranks: distributed.Dist
    tracker: Tracker = field(default_factory=NullTracker)
    pairs: dict = field(default_factory=dict)
    vocab: Vocab | None = None
    data_sha: str = ""
    heldout: dict | None = None
    ckpt_dir: Path = Path()
    model: torch.nn.Module | None = None
    net: torch.nn.Module | None = None  # the model as trained: under DDP and/or torch.compile
    opt: torch.optim.Optimizer | None = None
    resumed: dict = field(default_factory=dict)  # the checkpoint's state, {} for a fresh start
    logged: int = 0  # last step MLflow has: a resumed run does not log its steps twice
    sampler: SystemSampler = field(default_factory=lambda: SystemSampler(NullTracker(), 0))  # system/* metrics
    live: LiveCurves | None = None  # the plot CSVs, growing while training runs (rank 0)


def start_process(cfg: TrainConfig) -> Run:
    """This process's device, CPU threads and malloc settings, and its place in the process group."""
    device = resolve_device(cfg.device, distributed.int_env("LOCAL_RANK"))
    threads = ThreadShare(cfg.threads, count_me=device.type == "cpu")
    threads.start()  # every CPU training counts, so `auto` ones share the cores with it
    if device.type == "cpu":
        tune_cpu_malloc()  # reuse the big per-step buffers instead of page-faulting them in every step
    return Run(device, threads, distributed.init(device))


def set_up(run: Run, model_cfg: ModelConfig, cfg: TrainConfig, tracking_cfg: TrackingConfig,
           eval_cfg: EvalConfig, params: dict[str, Any], paths: Paths) -> None:
    """Data, model and optimizer, resumed from the latest checkpoint when there is one; rank 0 opens
    (or resumes) the MLflow run and sends it the steps the checkpoint holds that it never stored."""
    ranks = run.ranks
    run.pairs, run.vocab = load_pairs(paths.pairs)[0], Vocab.load(paths.vocab)
    run.data_sha = sha256_file(paths.pairs)
    if cfg.eval_every and ranks.is_main:
        valid, valid_meta = load_pairs(paths.valid_pairs)
        check_vocab({"vocab_sha256": run.vocab.sha256}, valid_meta.get("vocab_sha256"), paths.valid_pairs)
        run.heldout = heldout_subset(valid, eval_cfg.subset_pairs)
    run.ckpt_dir = paths.checkpoints / run_fingerprint(model_cfg, cfg, run.data_sha, run.vocab.sha256, ranks.world)
    run.model = build_model(model_cfg, len(run.vocab), seed=cfg.seed).to(run.device)
    run.opt = make_optimizer(run.model.parameters(), cfg)
    latest, damaged = checkpoint.latest(run.ckpt_dir)
    run.resumed = checkpoint.load(latest, run.model, run.opt) if latest else {}
    if ranks.is_main:
        run.tracker = start_run(tracking_cfg, paths.root, run_id=run.resumed.get("mlflow_run_id"),
                                params=params, params_file=paths.params_file)  # a new run logs params
        run.tracker.set_tags({"train_pairs_sha256": run.data_sha, "vocab_sha256": run.vocab.sha256,
                              "device": str(run.device)})  # start_run adds the git and DVC tags
        log_data_inputs(run.tracker, data_inputs(paths, run.data_sha, run.vocab.sha256, run.heldout is not None),
                        paths.root)
        run.sampler = SystemSampler(run.tracker, tracking_cfg.system_metrics_every_s,
                                    run.device.type == "cuda").start()
        for line in damaged:
            print(f"warning: pretrain: {line}", file=sys.stderr, flush=True)
        if latest:
            print(f"pretrain: resuming from {latest} (step {run.resumed['step']})", flush=True)
    run.logged = run.tracker.last_step("mlm_loss") or 0
    # Steps the checkpoint holds that MLflow never stored: metrics go out from a background sender,
    # so a kill -9 can lose the last points it had queued. The checkpoint's history has them.
    log_new_steps(run, run.resumed.get("history") or [])
    run.logged = max(run.logged, run.resumed.get("step", 0))
    run.live = LiveCurves(paths.curve_csv, paths.valid_curve, enabled=ranks.is_main)
    run.live.start(run.resumed.get("history"))  # the plot CSVs grow from here while training runs
    run.net = run.model
    if ranks.enabled:
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)


def log_new_steps(run: Run, rows: list[dict]) -> None:
    """Send MLflow the rows past the last step it has (a resumed run re-trains steps already logged)."""
    for r in rows:
        if r["step"] > run.logged:
            run.tracker.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"])


def train(run: Run, cfg: TrainConfig, eval_cfg: EvalConfig):
    """The training loop from the resumed step to `train.max_steps`, with progress, MLflow metrics,
    checkpoints (rank 0 writes them) and the held-out hook; `fit`'s result."""
    ranks, start = run.ranks, run.resumed.get("step", 0)
    bar = Progress("pretrain", cfg.max_steps, "steps", start=start, enabled=ranks.is_main)

    def on_log(rows):
        run.threads.refresh()  # `auto`: trainings may have started or ended since
        log_new_steps(run, rows)
        run.live.append(rows)
        r = rows[-1]
        held = f"  valid mlm {r['valid_mlm_loss']:.3f}" if "valid_mlm_loss" in r else ""
        bar.update(r["step"], f"mlm {r['mlm_loss']:.3f}  nsp {r['nsp_loss']:.3f}{held}  {r['pairs_per_sec']:.0f} pairs/s")
        drop_mapped_pages(run.pairs)  # the mapped rows these steps touched leave RSS (page cache keeps them)

    saved: dict[str, Any] = {"last": None, "failed": 0}

    def on_checkpoint(step, history, scaler_state):
        """A checkpoint is insurance: one that cannot be written (full disk, quota, read-only,
        permission) costs only itself; one warning line, then training goes on."""
        if not ranks.is_main:
            return None
        try:
            saved["last"] = checkpoint.save(run.ckpt_dir, step, run.model, run.opt,
                                            {"history": history, "mlflow_run_id": run.tracker.run_id}, scaler_state)
        except WriteError as e:
            saved["failed"] += 1
            if saved["failed"] == 1:  # the same cause each time: say it once
                print(f"warning: pretrain: checkpoint of step {step} not saved: {e}; training goes on "
                      "(later checkpoints that fail are skipped without a word)", file=sys.stderr, flush=True)
        return saved["last"]

    if ranks.is_main:
        print(f"pretrain: training steps {start + 1}..{cfg.max_steps} on {run.device} x{ranks.world}", flush=True)
    # the bare model, not `net`: only rank 0 evaluates, and DDP's forward could wait for the others.
    batch = heldout_batch_size(eval_cfg.batch_size, cfg.batch_size, ranks.world)
    on_eval = heldout_hook(run.model, run.heldout, batch, run.device) if run.heldout else None
    result = fit(run.net, run.opt, cfg, to_tensors(run.pairs, run.device), run.device, ranks,
                 start_step=start, history=run.resumed.get("history"),
                 on_log=on_log, on_checkpoint=on_checkpoint, scaler_state=run.resumed.get("scaler"),
                 on_eval=on_eval, vocab_size=len(run.vocab))
    # Every rank leaves the group here, so rank 0's output work in `finish` (files, MLflow: minutes on a
    # slow server) runs under no collective's timeout while the others wait for it (NCCL's is 10 minutes).
    distributed.shutdown()
    return result


def finish(run: Run, result, model_cfg: ModelConfig, cfg: TrainConfig, params: dict[str, Any], paths: Paths,
           run_name: str | None, t_start: float) -> dict[str, Any]:
    """Rank 0: the model, metrics and plots on disk, the same into the run's MLflow artifacts, then the
    run closed and its checkpoints removed. {} elsewhere."""
    if not run.ranks.is_main:
        return {}
    run.opt.zero_grad(set_to_none=True)  # training's gradients and heap pages are not needed any more
    if run.device.type == "cpu":
        release_cpu_memory()
    metrics = final_metrics(result, cfg, run, t_start)
    if run_name is None:  # the MLflow run's own name and what differs, tracked or not
        name, tags = describe_run(params, paths.params_file)
        diff = tags.get(DIFF_TAG)
        run_name = name if not diff or diff == name else f"{name} ({diff})"
    hist, tracker = result.history, run.tracker
    write_outputs(run.model, hist, metrics, run.vocab, run.data_sha, paths,
                  plots.run_title(run_name, asdict(model_cfg), asdict(cfg)))
    tracker.log_metrics({f"final_{k}": metrics[k] for k in ("mlm_loss_avg", "nsp_loss_avg",
                                                              "pairs_per_sec", "tokens_per_sec", "wall_s")})
    if run.resumed.get("mlflow_run_id") is None:  # a run this process named: add what only the end knows
        tracker.set_tags(wall_tags(params, paths, metrics["wall_s"], result.train_s))
    for f in (paths.models / "bert.safetensors", paths.models / "bert.json", paths.vocab):
        tracker.log_artifact(f, "weights")  # enough to rebuild the encoder: `minibert encode --run ID`
    for f in (paths.curve_csv, paths.curve_png, paths.valid_curve, paths.metrics, paths.params_file):
        if f is not None and f.is_file():
            tracker.log_artifact(f)
    run.sampler.stop()
    tracker.close()
    shutil.rmtree(run.ckpt_dir, ignore_errors=True)  # complete: nothing left to resume
    return metrics


def final_metrics(result, cfg: TrainConfig, run: Run, t_start: float) -> dict[str, Any]:
    """metrics/train.json: last and mean losses, throughput, wall time, where and how it trained."""
    hist = result.history
    amp = resolve_precision(cfg.precision, run.device)
    metrics = {
        "mlm_loss": hist[-1]["mlm_loss"], "nsp_loss": hist[-1]["nsp_loss"],
        "mlm_loss_avg": sum(r["mlm_loss"] for r in hist) / len(hist),
        "nsp_loss_avg": sum(r["nsp_loss"] for r in hist) / len(hist),
        "pairs_per_sec": result.pairs / result.train_s if result.train_s else 0.0,
        "tokens_per_sec": result.tokens / result.train_s if result.train_s else 0.0,
        "wall_s": time.perf_counter() - t_start, "steps": len(hist), "device": str(run.device),
        "precision": str(amp).replace("torch.", "") if amp else "fp32", "world_size": run.ranks.world,
        "micro_batches": resolve_micro_batches(cfg.micro_batches, run.device, amp),  # what `auto` came to
        "mlflow_run_id": run.tracker.run_id or "",
    }
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def wall_tags(params: dict[str, Any], paths: Paths, wall_s: float, train_s: float) -> dict[str, str]:
    """The run's description with its wall time appended, and a budget run's name with it (tracking/runinfo.py)."""
    name, tags = describe_run(params, paths.params_file, wall_s=wall_s)
    out = {NOTE_TAG: f"{tags[NOTE_TAG]}; trained in {wall_s:.0f} s wall ({train_s:.0f} s in steps)"}
    if params.get("train.budget_minutes"):
        out["mlflow.runName"] = name
    return out


def run_status(e: BaseException) -> str:
    """MLflow's end state for a run stopped by `e`: KILLED when asked to stop, FAILED otherwise (NaN too)."""
    return "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED"


def data_inputs(paths: Paths, data_sha: str, vocab_sha: str, heldout: bool) -> list[DataInput]:
    """The run's data as lineage inputs: train pairs, vocabulary, and the valid pairs when it scores them."""
    root = paths.root.resolve()

    def rel(p: Path) -> str:  # as dvc.yaml names it, relative to the project root
        p = Path(p).resolve()
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    out = [DataInput("train_pairs", rel(paths.pairs), data_sha, "training"),
           DataInput("vocab", rel(paths.vocab), vocab_sha, "vocabulary")]
    if heldout:
        out.append(DataInput("valid_pairs", rel(paths.valid_pairs), sha256_file(paths.valid_pairs), "validation"))
    return out


def write_outputs(model, history, metrics, vocab: Vocab, data_sha: str, paths: Paths,
                  title: str = "minibert pretraining") -> None:
    """models/, the curves, the plot and metrics/train.json, all or none: a full disk (WriteError)
    leaves every previous output as it was."""
    with all_or_nothing():
        _write_outputs(model, history, metrics, vocab, data_sha, paths, title)


def _write_outputs(model, history, metrics, vocab: Vocab, data_sha: str, paths: Paths, title: str) -> None:
    save_pretrained(model, paths.models, {"vocab_sha256": vocab.sha256, "step": metrics["steps"],
                                          "train_pairs_sha256": data_sha, "mlflow_run_id": metrics["mlflow_run_id"]})
    with atomic_path(paths.curve_csv) as tmp:
        pd.DataFrame(history, columns=TRAIN_COLUMNS).to_csv(tmp, index=False)
    heldout = [r for r in history if "valid_mlm_loss" in r]  # header only when eval_every is 0
    with atomic_path(paths.valid_curve) as tmp:
        pd.DataFrame(heldout, columns=VALID_COLUMNS).to_csv(tmp, index=False)
    plots.loss_curves(history, paths.curve_png, title, vocab_size=len(vocab), max_steps=history[-1]["step"])
    write_json(paths.metrics, metrics)
