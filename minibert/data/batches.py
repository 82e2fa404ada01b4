"""The pairs on the device and the batches cut from them: what training and held-out evaluation share.

Kept apart from the training loop (`minibert.training.loop`) so the evaluate stage depends on this small
module only: a change to the loop reruns pretrain, not evaluate.
"""
from __future__ import annotations

import numpy as np
import torch

from minibert.data.pairs import FIELDS


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
