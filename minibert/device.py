"""Which device a setting names: every stage that runs the model resolves `*.device` here, and imports
nothing else for it (no data, no training code)."""
from __future__ import annotations

import torch

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
