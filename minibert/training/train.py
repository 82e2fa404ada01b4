"""Training a model in memory: the one place that builds a model, its optimizer and the pairs on the
device, then runs the training loop.

`train_model` is what a caller with a config and pair arrays uses (`minibert budget`, the benches, the
tests, the GPU check): the model is built from `model_cfg` seeded by `train_cfg.seed`, the optimizer is
`train_cfg`'s (`make_optimizer`), the arrays go to the device once (`to_tensors`), and `fit` runs
the steps with the batch plan (`minibert.data.batches`). The pretrain stage alone assembles the same
pieces by hand, because it resumes model and optimizer from a checkpoint in between.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from minibert.config import ModelConfig, TrainConfig
from minibert.data.batches import to_tensors
from minibert.device import resolve_device
from minibert.model.bert import BERT, build_model
from minibert.training.distributed import Dist
from minibert.training.loop import FitResult, fit, make_optimizer

Hooks = Callable[[BERT, torch.optim.Optimizer], dict]


def train_model(model_cfg: ModelConfig, train_cfg: TrainConfig, data: dict[str, np.ndarray] | dict[str, torch.Tensor],
                vocab_size: int, *, device: str | torch.device | None = None, dist: Dist | None = None,
                optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                hooks: Hooks | None = None) -> tuple[BERT, FitResult]:
    """A fresh model trained on `data` (pair arrays, or tensors already on `device`) for `train_cfg`'s
    steps. -> (the bare model, `fit`'s result).

    `device`: default `train_cfg.device` resolved. `dist`: the process group (default: one process); when
    it has several processes the model trains under DDP. `optimizer(params, train_cfg)`: default
    `make_optimizer`. `hooks(model, optimizer)`, called once both exist and before the first step, returns
    keyword arguments for `fit`: its callbacks (`on_log`, `on_eval` scoring the model being trained,
    `on_checkpoint` saving it) and, for a run resumed from a checkpoint loaded into them, `start_step`,
    `history` and `scaler_state`."""
    device = resolve_device(train_cfg.device) if device is None else torch.device(device)
    dist = dist or Dist()
    model = build_model(model_cfg, vocab_size, seed=train_cfg.seed).to(device)
    opt = (optimizer or make_optimizer)(model.parameters(), train_cfg)
    kwargs = hooks(model, opt) if hooks else {}  # before DDP: a checkpoint loads into the bare model
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    tensors = data if all(isinstance(v, torch.Tensor) for v in data.values()) else to_tensors(data, device)
    return model, fit(net, opt, train_cfg, tensors, device, dist, vocab_size=vocab_size, **kwargs)
