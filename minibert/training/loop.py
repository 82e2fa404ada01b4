"""The pretraining loop: seeded order, mixed precision, DDP, checkpoints and resume.

Reproducibility is by construction, not by luck: the batch of step s is a pure function of
(seed, s) and the dropout generator is reseeded from (seed, rank, s) before every step, so a run
resumed from a checkpoint continues exactly as the uninterrupted one (bit for bit on CPU). Losses
stay on the device and reach the host once per `log_every` steps.
"""
from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from minibert.config import TrainConfig
from minibert.data.batches import BatchPlan, split_batch
from minibert.errors import Interrupted, MinibertError
from minibert.training import distributed


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based `step`: the book's constant rate, or linear warmup over `cfg.warmup` steps
    to `lr`, then linear decay that would reach 0 at `max_steps` (the last update, step max_steps - 1,
    gets lr / (max_steps - warmup)). A pure function of (step, cfg), so a resumed run continues the
    schedule exactly; the shape stretches with the budget when the warmup is a share."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.max_steps - warmup)
    return cfg.lr * max(0.0, 1.0 - (step - warmup) / span)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout seed of one rank at one step (disjoint streams across ranks and steps)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: the CPU multiplies bf16 natively."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's private probes
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        precision = "bf16" if fast else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class PendingLosses:
    """Per-step loss tensors kept on the device between host syncs."""
    steps: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)      # each (2,): this rank's mlm, nsp means
    counts: list[tuple[float, float]] = field(default_factory=list)  # this rank's (MLM slots, pairs)
    totals: list[tuple[float, float]] = field(default_factory=list)  # the global batch's (MLM slots, pairs)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, step: int, mlm: torch.Tensor, nsp: torch.Tensor, counts, totals) -> None:
        self.steps.append(step)
        self.losses.append(torch.stack([mlm.detach().float(), nsp.detach().float()]))
        self.counts.append(counts)
        self.totals.append(totals)

    def global_losses(self, d: distributed.Dist) -> list[tuple[float, float]]:
        """Per-step global-batch mean losses: each rank's mean times its count, summed over ranks."""
        local = torch.stack(self.losses)                                   # (S, 2)
        counts = torch.tensor(self.counts, dtype=torch.float32)            # (S, 2), on the host
        if d.enabled:  # the sum over ranks runs where the backend wants it (NCCL: on the GPU)
            sums = distributed.all_sum(local * counts.to(local.device), d).cpu()  # (S, 2)
        else:  # one read-back, no copy to the device: a GPU waits for the host once per log step
            sums = local.cpu() * counts
        return [(float(m), float(n)) for m, n in (sums / torch.tensor(self.totals)).tolist()]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step."""

    def __init__(self):
        self.signum: int | None = None

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for s in old:
                signal.signal(s, self._set)
        except ValueError:  # not the main thread: leave handlers alone
            old = {}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _set(self, signum, frame) -> None:
        self.signum = signum


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The book's Adam, or AdamW whose decay skips vectors: biases and LayerNorm gains/shifts (ndim < 2)
    are not weights a decay toward 0 should shrink (BERT, RoBERTa, Cramming all exempt them)."""
    # fused: one kernel over all parameters (CUDA, and CPU since torch 2.4: ~5 ms/step saved here)
    betas = (0.9, cfg.beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, fused=True)
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


CPU_MICRO_BATCHES = 4  # what `micro_batches: auto` means for fp32 on CPU (config.TrainConfig.micro_batches)


def resolve_micro_batches(micro_batches: int | str, device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """`auto`: 4 passes for fp32 on CPU, 1 otherwise (bf16 on CPU, any GPU); a number is taken as given.

    On the bf16 CPUs one pass is 20-45 % faster a step *and* peaks lower: each of the 4 passes' widths
    is a new GEMM shape for oneDNN, which keeps a primitive and its buffers per bf16 shape (+420 MB
    resident over 20 steps on an AMX Xeon, 13 widths), and the per-pass fixed costs count more the faster
    the GEMMs are. fp32 one pass peaks ~450 MB higher (activations of 512 pairs) for ~2 %."""
    if micro_batches == "auto":
        return CPU_MICRO_BATCHES if device.type == "cpu" and amp_dtype is None else 1
    return int(micro_batches)


def train_step(model, opt, scaler, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
               scale_mlm: float, scale_nsp: float, amp_dtype: torch.dtype | None, device: torch.device,
               micro_batches: int = 1, grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the (mlm, nsp) losses of this rank's shard as device tensors.

    `scale_*` turn this rank's means into its share of the global-batch mean, so DDP's gradient
    averaging over ranks yields exactly the single-process gradient. With `micro_batches` > 1 the
    batch runs as that many forward/backward passes; each pass's mean is weighted by its share of the
    batch's MLM slots and pairs, so the summed gradient is the one-pass gradient (DDP syncs only on the
    last pass). `batch` may come already cut (a list of micro-batches, `plan.micro_batch_rows`): then
    `micro_batches` is not used. `grad_clip` > 0 scales the summed (under DDP: averaged) gradient to at
    most that global L2 norm before the update."""
    opt.zero_grad(set_to_none=True)
    parts = batch if isinstance(batch, list) else split_batch(batch, micro_batches)
    slots = sum((p["mlm_weights"] > 0).sum() for p in parts)  # device tensor: no host sync
    pairs = sum(len(p["nsp_labels"]) for p in parts)
    mlm_sum = nsp_sum = 0.0
    for j, part in enumerate(parts):
        last = j == len(parts) - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast(device, amp_dtype):
                mlm, nsp = model(part["token_ids"], part["segments"], part["valid_lens"], part["pred_positions"],
                                 part["mlm_weights"], part["mlm_labels"], part["nsp_labels"])
            w_mlm = (part["mlm_weights"] > 0).sum() / slots  # this pass's share of the slots
            w_nsp = len(part["nsp_labels"]) / pairs
            loss = mlm * (w_mlm * scale_mlm) + nsp * (w_nsp * scale_nsp)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        mlm_sum = mlm_sum + mlm.detach() * w_mlm
        nsp_sum = nsp_sum + nsp.detach() * w_nsp
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradient, not the loss-scaled one
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return mlm_sum, nsp_sum


def check_finite(step: int, mlm: float, nsp: float, last_ckpt: Any) -> None:
    for name, value in (("MLM", mlm), ("NSP", nsp)):
        if not math.isfinite(value):
            raise MinibertError(f"{name} loss is {value} at step {step}; stopped (last good checkpoint: "
                                f"{last_ckpt or 'none'}); lower train.lr or use train.precision: fp32")


@dataclass
class FitResult:
    history: list[dict[str, float]]      # one row per step: step, mlm_loss, nsp_loss, pairs_per_sec, train_s
    train_s: float                        # seconds spent in steps run by this process
    pairs: int                            # global pairs processed by this process's steps
    tokens: int                           # global real tokens in those pairs


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, data: dict[str, torch.Tensor],
        device: torch.device, d: distributed.Dist, *, start_step: int = 0, history: list | None = None,
        on_log=None, on_checkpoint=None, on_eval=None, scaler_state: dict | None = None,
        vocab_size: int = 0) -> FitResult:
    """Train from `start_step` to `cfg.max_steps`.

    `on_log(rows)` receives new history rows after every host sync (rank 0 logs them);
    `on_checkpoint(step, history, scaler_state)` is called every `checkpoint_every` steps and on
    SIGTERM/SIGINT (then `fit` raises); `scaler_state` is the fp16 GradScaler's (None otherwise),
    given back as `scaler_state` on resume. `on_eval(step)` runs every `eval_every` steps and at the
    last, after the step's update: the dict it returns (held-out figures; None for nothing) joins that
    step's history row. All run on every rank; the callee decides what rank 0 alone does. Evaluation
    runs outside the timed interval (it does not lower pairs_per_sec) and cannot move the training
    numbers: dropout is reseeded before every step. Each step's batch comes from the batch plan
    (`minibert.data.batches`); `train.masking: dynamic` redraws its masks and needs `vocab_size`."""
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if scaler is not None and scaler_state:  # the loss scale it had learnt, not the initial 2**16
        scaler.load_state_dict(scaler_state)
    plan = BatchPlan(data, cfg, device, d, resolve_micro_batches(cfg.micro_batches, device, amp_dtype), vocab_size)
    history = list(history or [])
    # training seconds before this call (a resumed run continues its clock): the held-out curve's x in time
    clock = float(history[-1].get("train_s", 0.0)) if history else 0.0
    interval, last_ckpt = PendingLosses(), None
    train_s, pairs, tokens = 0.0, 0, 0
    model.train()
    with StopFlag().installed() as stop:
        for step in range(start_step, cfg.max_steps):
            for group in opt.param_groups:
                group["lr"] = get_lr(step, cfg)
            b = plan.step(step)
            torch.manual_seed(step_seed(cfg.seed, d.rank, step))
            mlm, nsp = train_step(model, opt, scaler, b.parts, b.slots / b.slots_total * d.world,
                                  b.pairs / b.pairs_total * d.world, amp_dtype, device, grad_clip=cfg.grad_clip)
            interval.add(step, mlm, nsp, (b.slots, float(b.pairs)), (b.slots_total, float(b.pairs_total)))
            pairs += b.pairs_total
            tokens += b.tokens_total
            last = step + 1 == cfg.max_steps
            ckpt_due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            # from the config alone, not from whether a rank was given a hook: every rank syncs at the same steps
            eval_due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last)
            stopping = distributed.any_rank(stop.signum is not None, d, device)
            if (step + 1) % cfg.log_every == 0 or last or ckpt_due or eval_due or stopping:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - interval.t0
                train_s += elapsed
                losses = interval.global_losses(d)
                rate = sum(p for _, p in interval.totals) / elapsed
                rows = [{"step": s + 1, "mlm_loss": m, "nsp_loss": ns, "pairs_per_sec": rate,
                         "train_s": clock + train_s} for s, (m, ns) in zip(interval.steps, losses)]
                for r in rows:
                    check_finite(r["step"], r["mlm_loss"], r["nsp_loss"], last_ckpt)
                if eval_due and on_eval:  # rows[-1] is this step: an eval step always syncs
                    held = on_eval(step + 1) or {}
                    # training seconds to this point (evaluations left out): the curve against wall-clock
                    rows[-1].update({**held, "valid_wall_s": clock + train_s} if held else {})
                history += rows
                if on_log:
                    on_log(rows)
                interval = PendingLosses()
                if (ckpt_due or stopping) and not last and on_checkpoint:
                    last_ckpt = on_checkpoint(step + 1, history, scaler.state_dict() if scaler else None)
                if stopping and not last:  # on the last step: finish normally, outputs get written
                    raise Interrupted(f"stopped by signal at step {step + 1} of {cfg.max_steps}; checkpoint "
                                        f"saved ({last_ckpt}); rerun the stage to resume")
                interval.t0 = time.perf_counter()
    return FitResult(history=history, train_s=train_s, pairs=pairs, tokens=tokens)
