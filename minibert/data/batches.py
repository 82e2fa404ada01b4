"""The pairs on the device and the batches cut from them: held-out evaluation's, and the training plan.

The batch plan is here in one place: which pairs a training step trains on (`batch_indices`: epoch e is
a permutation from (seed, e)), this rank's disjoint shard of them, their masks (static: the pairs
stage's; dynamic: redrawn for the whole global batch from (seed, step), `minibert.data.masking`) and
the cut into micro-batches of similar length (`micro_batch_rows`, computed on the host from the
lengths, so a GPU waits for nothing). `fit` asks `BatchPlan.step` for each step; the benches and tests
use the same functions. Kept apart from the training loop (`minibert.training.loop`), so a change to
the loop reruns pretrain, not evaluate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from minibert.config import TrainConfig
from minibert.data.masking import redraw, step_rng
from minibert.data.pairs import FIELDS
from minibert.errors import MinibertError


def to_tensors(pairs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Pre-stacked tensors, converted once: ids and positions as int32 (the model widens a batch's own
    ids; int64 copies of the whole split cost 50 MB of RSS here), weights as float32. On CPU the
    tensors share memory with `pairs` when the dtypes already match."""
    out = {k: torch.from_numpy(np.asarray(pairs[k], dtype=np.float32 if k == "mlm_weights" else np.int32))
           for k in FIELDS}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return out


def gather_batch(data: dict[str, torch.Tensor], idx: np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
    """One batch, trimmed to its longest sequence (pad columns beyond it change nothing). `width`: that
    length when the caller knows it (else read from the device: a host sync on a GPU)."""
    device = data["valid_lens"].device
    i = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    # a pinned source lets the copy to a GPU run asynchronously (a pageable one waits for it)
    i = i.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else i.to(device)
    batch = {k: v.index_select(0, i) for k, v in data.items()}
    t = int(batch["valid_lens"].max()) if width is None else width
    batch["token_ids"] = batch["token_ids"][:, :t]  # (b, t)
    batch["segments"] = batch["segments"][:, :t]    # (b, t)
    return batch


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Global batch of `step`: epoch e is a fresh permutation from (seed, e); the last batch of an
    epoch may be short, as with the book's DataLoader(shuffle=True)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size]


def micro_batch_rows(idx: np.ndarray, lens: np.ndarray, parts: int) -> list[np.ndarray]:
    """`split_batch`'s cut computed on the host from the pairs' lengths `lens` (all pairs): the rows of
    each micro-batch, so cutting a batch on a GPU waits for nothing (the device tensors are not read)."""
    if parts <= 1 or len(idx) <= 1:
        return [idx]
    order = np.argsort(lens[idx], kind="stable")
    return [idx[o] for o in np.array_split(order, min(parts, len(idx)))]


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Up to `parts` micro-batches of pairs of similar length, each trimmed to its longest pair.

    The batch is sorted by valid length (stable: ties keep batch order) and cut into contiguous runs.
    Interleaved rows (j, j + parts, ...) left every micro-batch as long as the batch's longest pair
    (~64 at WikiText-2's lengths); sorted runs are ~40, 48, 56 and 64 long, so the attention's padded
    (T, T) work drops to ~2/3. The gradient is the same: train_step weights each pass by its share."""
    n = len(batch["nsp_labels"])
    if parts <= 1 or n <= 1:
        return [batch]
    order = np.argsort(batch["valid_lens"].cpu().numpy(), kind="stable")
    return [gather_batch(batch, idx) for idx in np.array_split(order, min(parts, n))]


@dataclass
class StepBatch:
    """One step's input on this rank and the counts that weight its losses into the global batch's."""
    parts: list[dict[str, torch.Tensor]]  # this rank's micro-batches, each trimmed to its longest pair
    pairs: int                            # this rank's pairs
    pairs_total: int                      # the global batch's pairs
    slots: float                          # this rank's real MLM slots
    slots_total: float                    # the global batch's
    tokens_total: int                     # real tokens in the global batch


class BatchPlan:
    """The batches of one training run over `data` (the pairs on the device, `to_tensors`), for process
    `d.rank` of `d.world` (a `minibert.training.distributed.Dist`)."""

    def __init__(self, data: dict[str, torch.Tensor], cfg: TrainConfig, device: torch.device, d,
                 micro_batches: int, vocab_size: int = 0):
        if cfg.masking == "dynamic" and vocab_size < 1:
            raise MinibertError("fit: train.masking = 'dynamic' needs the vocabulary size (vocab_size=...)")
        self.data, self.cfg, self.device, self.d = data, cfg, device, d
        self.micro, self.vocab_size = micro_batches, vocab_size
        self.n = len(data["nsp_labels"])
        self.weights, self.lens = data["mlm_weights"].sum(1).cpu().numpy(), data["valid_lens"].cpu().numpy()
        # dynamic masks are drawn on the host: on CPU these are views of `data`, no copy
        self.host = {k: v.cpu().numpy() for k, v in data.items()} if cfg.masking == "dynamic" else None

    def step(self, step: int) -> StepBatch:
        cfg, d = self.cfg, self.d
        global_idx = batch_indices(step, self.n, cfg.batch_size, cfg.seed)
        idx = global_idx[d.rank::d.world]  # this rank's disjoint shard of the one global order
        if len(idx) == 0:
            raise MinibertError(f"train.batch_size = {cfg.batch_size} leaves rank {d.rank} of {d.world} "
                                "without pairs; use a batch of at least one pair per process")
        if self.host is None:
            slots_total, slots = float(self.weights[global_idx].sum()), float(self.weights[idx].sum())
            # cut on the host (lengths known here): no device read before the step's kernels are queued
            parts = [gather_batch(self.data, rows, width=int(self.lens[rows].max()))
                     for rows in micro_batch_rows(idx, self.lens, self.micro)]
        else:  # the whole global batch re-masked, then cut: the masks do not depend on the world size
            fresh = redraw({k: v[global_idx] for k, v in self.host.items()}, cfg.mask_rate, self.vocab_size,
                           step_rng(cfg.seed, step))
            mine = np.arange(len(global_idx))[d.rank::d.world]
            w = fresh["mlm_weights"].sum(1)
            slots_total, slots = float(w.sum()), float(w[mine].sum())
            on_device = {k: torch.from_numpy(v).to(self.device) for k, v in fresh.items()}
            parts = [gather_batch(on_device, rows, width=int(fresh["valid_lens"][rows].max()))
                     for rows in micro_batch_rows(mine, fresh["valid_lens"], self.micro)]
        return StepBatch(parts, len(idx), len(global_idx), slots, slots_total, int(self.lens[global_idx].sum()))
