"""The pairs on the device and the batches cut from them: what training, evaluation and probing share.

Kept apart from the training loop (`train.py`) so the evaluate and probe stages depend on this small
module only: a change to the loop reruns pretrain, not them.
"""
from __future__ import annotations

import numpy as np
import torch

from minibert.errors import MinibertError
from minibert.data.pairs import FIELDS


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinibertError(f"train.device = {name!r} but no CUDA device is visible; set train.device: cpu or auto")
    return torch.device(name)


def to_tensors(pairs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Pre-stacked tensors, converted once: ids and positions as int32 (the model widens a batch's own
    ids; int64 copies of the whole split cost 50 MB of RSS here), weights as float32. On CPU the
    tensors share memory with `pairs` when the dtypes already match."""
    out = {k: torch.from_numpy(np.asarray(pairs[k], dtype=np.float32 if k == "mlm_weights" else np.int32))
           for k in FIELDS}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return out


def gather_batch(data: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """One batch, trimmed to its longest sequence (pad columns beyond it change nothing)."""
    i = torch.from_numpy(idx).to(data["valid_lens"].device)
    batch = {k: v.index_select(0, i) for k, v in data.items()}
    t = int(batch["valid_lens"].max())
    batch["token_ids"] = batch["token_ids"][:, :t]  # (b, t)
    batch["segments"] = batch["segments"][:, :t]    # (b, t)
    return batch
