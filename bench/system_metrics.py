"""What the `system/*` sampler (tracking.system_metrics_every_s) costs a training.

    python -m bench.system_metrics [--rounds 5] [--steps 20] [--every 5] [--stress 0.1]

Two figures, on a real MLflow run (sqlite in a temp folder) and the book's model on one synthetic
batch (bench.step's shapes):
- per sample: CPU seconds the sampler thread spends on one sample (collectors + queueing), and that
  as a share of the interval (`--every`): the most it can take from training;
- per step: step time with the sampler off, on at `--every`, and on at `--stress` seconds (to make a
  cost visible at all), in interleaved rounds (off, on, stress, off, ...) so drift hits all alike;
  median of the rounds and the change against off.
Prints JSON. The issue's bound: <= 1 % of step time at the default 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sample_cost(tracker, samples: int = 20) -> float:
    """Median CPU seconds of one sample on this thread (what the sampler thread does every interval)."""
    from minibert.tracking.system_metrics import _Collectors

    c = _Collectors(gpu=torch.cuda.is_available())
    times = []
    for i in range(samples):
        t0 = time.thread_time()
        tracker.log_metrics(c.sample(), step=i)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


class Trainer:
    """The book's model, Adam and one synthetic batch of bench.step's shapes, built once."""

    def __init__(self):
        from bench import step as bs
        from minibert.config import ModelConfig
        from minibert.model import bert as mm

        torch.manual_seed(0)
        self.model = mm.build_model(ModelConfig(), bs.V, seed=0)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batch, self.loss = bs.synth_batch(), mm.pretrain_loss

    def seconds_per_step(self, steps: int) -> float:
        """Mean wall seconds of `steps` steps after one warm-up (the mean: a sampler's cost is interference)."""
        tokens, segments, valid, positions, weights, labels, nsp = self.batch
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            mlm, nsp_logits = self.model(tokens, segments, valid, positions, weights)
            total, _, _ = self.loss(mlm, labels, weights, nsp_logits, nsp)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self.opt.step()
        return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--stress", type=float, default=0.1)
    a = ap.parse_args()
    from minibert.config import TrackingConfig
    from minibert.tracking.runs import start_run
    from minibert.tracking.system_metrics import SystemSampler

    with tempfile.TemporaryDirectory(prefix="minibert-sysmetrics-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tracker = start_run(TrackingConfig(experiment="sysmetrics-bench"), Path(tmp))
        per_sample = sample_cost(tracker)
        trainer, runs = Trainer(), {"off": [], "on": [], "stress": []}
        for _ in range(a.rounds):
            for name, every in (("off", 0.0), ("on", a.every), ("stress", a.stress)):
                with SystemSampler(tracker, every):
                    runs[name].append(trainer.seconds_per_step(a.steps))
        tracker.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "sample_cpu_s": round(per_sample, 5), "share_of_interval_pct": round(100 * per_sample / a.every, 4),
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "on_vs_off_pct": round(100 * (med["on"] / med["off"] - 1), 2),
        "stress_vs_off_pct": round(100 * (med["stress"] / med["off"] - 1), 2),
        "every_s": a.every, "stress_every_s": a.stress, "rounds": a.rounds, "steps": a.steps}, indent=1))


if __name__ == "__main__":
    main()
