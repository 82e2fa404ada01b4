"""A training budget: how many steps N minutes buy on this machine, for one recipe.

The budget is a step count (`train.max_steps`), not a deadline. A run that stopped at a wall-clock
deadline would take another number of steps on every machine and every rerun, so its losses could
not be reproduced; a step count gives the same losses everywhere (bit for bit on CPU), resumes
exactly, and fixes the schedule's shape (warmup share, linear decay to 0 at the last step). What
the minutes buy is measured here once, on the real train pairs, with the recipe's own config and
the training loop itself (`train_model`): a few warm-up steps, then timed steps, plus one held-out
evaluation of `eval.subset_pairs` pairs when `train.eval_every` draws a curve. `minibert budget`
prints the steps and the `-S` flags; `train.budget_minutes` records the intent in the run's name.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from minibert.config import Config
from minibert.device import resolve_device
from minibert.errors import MinibertError
from minibert.evaluation.heldout import heldout_batch_size, heldout_hook, heldout_subset
from minibert.training.loop import resolve_precision
from minibert.training.train import train_model


@dataclass(frozen=True)
class StepCost:
    step_s: float       # seconds of one training step (mean over the timed steps)
    eval_s: float       # seconds of one held-out evaluation during training (0 without a curve)
    eval_every: int     # steps between those evaluations (0: none)
    device: str
    precision: str
    threads: int
    timed_steps: int = 0  # steps the step time is the mean of (>= `timed`; more to fill min_seconds)


def steps_for(minutes: float, cost: StepCost) -> int:
    """Steps that fit in `minutes`: each step costs `step_s` plus its share of an evaluation every
    `eval_every` steps (the run's last-step evaluation and its start-up are left out)."""
    if minutes <= 0:
        raise MinibertError(f"--minutes {minutes:g}: give a positive number of minutes")
    per_step = cost.step_s + (cost.eval_s / cost.eval_every if cost.eval_every else 0.0)
    return max(1, int(minutes * 60.0 / per_step))


def measure(cfg: Config, train: dict[str, np.ndarray], valid: dict[str, np.ndarray] | None, vocab_size: int,
            warmup: int = 3, timed: int = 10, min_seconds: float = 10.0) -> StepCost:
    """Time `timed` training steps of `cfg`'s recipe on the `train` pairs after `warmup` untimed ones
    (oneDNN builds its kernels on the first steps), and one held-out evaluation of `valid`'s subset
    when `cfg.train.eval_every` > 0, on this machine.

    The timed steps span at least `min_seconds`: when `timed` steps take less, the measurement is
    repeated with as many steps as fill it. A 2-core VM stalls for a second now and then; in ten 0.1 s
    steps one stall doubled a recipe's step time (and halved its budget's steps)."""
    if warmup < 1 or timed < 1 or min_seconds < 0:
        raise MinibertError(f"budget: warm-up {warmup} and timed {timed} steps must both be >= 1 "
                            f"and min_seconds {min_seconds:g} >= 0")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads not in (0, "auto"):
        torch.set_num_threads(int(cfg.train.threads))
    model, step_s = _time_steps(cfg, train, vocab_size, device, warmup, timed)
    if step_s * timed < min_seconds:
        timed = math.ceil(min_seconds / step_s)
        model, step_s = _time_steps(cfg, train, vocab_size, device, warmup, timed)
    eval_s = 0.0
    if cfg.train.eval_every and valid is not None:
        batch = heldout_batch_size(cfg.eval.batch_size, cfg.train.batch_size)
        score = heldout_hook(model, heldout_subset(valid, cfg.eval.subset_pairs), batch, device)
        score(0)  # warm-up: the eval shapes' kernels
        t0 = time.perf_counter()
        score(0)
        eval_s = time.perf_counter() - t0
    amp = resolve_precision(cfg.train.precision, device)
    return StepCost(step_s=step_s, eval_s=eval_s, eval_every=cfg.train.eval_every if eval_s else 0,
                    device=str(device), precision=str(amp).replace("torch.", "") if amp else "fp32",
                    threads=torch.get_num_threads(), timed_steps=timed)


def _time_steps(cfg: Config, train: dict[str, np.ndarray], vocab_size: int, device: torch.device,
                warmup: int, timed: int) -> tuple[torch.nn.Module, float]:
    """(the trained model, mean seconds of the `timed` steps after `warmup`) of a fresh run of the recipe."""
    tcfg = dataclasses.replace(cfg.train, max_steps=warmup + timed, eval_every=0, checkpoint_every=0,
                               log_every=1, budget_minutes=0.0)
    model, result = train_model(cfg.model, tcfg, train, vocab_size, device=device)
    clock = [r["train_s"] for r in result.history]  # cumulative seconds after each step (log_every 1)
    return model, (clock[-1] - clock[warmup - 1]) / timed


def flags(preset: str, steps: int, minutes: float) -> str:
    """The `dvc exp run` line of a budget run (the preset's recipe, the budget as its step count)."""
    preset_flag = f"-S preset={preset} " if preset != "book" else ""
    return f"dvc exp run {preset_flag}-S train.max_steps={steps} -S train.budget_minutes={minutes:g}"
