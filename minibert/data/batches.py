"""The pairs on the device and the batches cut from them: what training, evaluation and probing share.

Kept apart from the training loop (`train.py`) so the evaluate and probe stages depend on this small
module only: a change to the loop reruns pretrain, not them.
"""
from __future__ import annotations

import numpy as np
import torch

from minibert.data.pairs import FIELDS
from minibert.errors import MinibertError


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` (the setting `key`) as a device: with `cuda`, process `local_rank`
    of a node takes GPU `local_rank`, one GPU per process."""
    given = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinibertError(f"{key} = {given!r} but no CUDA device is visible; set {key}: cpu or auto")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise MinibertError(f"{key} = {given!r}: GPU {device.index} (local rank {local_rank}) but only "
                            f"{torch.cuda.device_count()} GPU(s) visible; use one process per GPU (train.devices: "
                            "auto) or a visible cuda:N")
    return device


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
