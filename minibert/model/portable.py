"""Which code a tensor takes: minibert's C++ CPU kernels, or the portable torch path every other device runs.

CPU tensors take the kernels (minibert/model/kernels/, fastest on a CPU); CUDA and any other device take plain
torch ops: F.dropout, F.scaled_dot_product_attention, torch's LayerNorm and cross-entropy, and a
fixed-size training layout with no host syncs (minibert/model/bert.py). The switch below sends CPU tensors
down that portable path too, so every CPU test run exercises the code a GPU run takes:

    MINIBERT_PORTABLE=1 python -m pytest ...     # the whole process
    use_portable(True) / with portable_path():   # from code (tests); wins over the variable

Both are read at call time (each op asks), so flipping the switch needs no rebuilt model.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor

ENV = "MINIBERT_PORTABLE"
_forced: bool | None = None  # set by use_portable; None: the environment variable decides


def use_portable(on: bool | None) -> None:
    """Force the portable path on (True) or off (False); None hands the choice back to $MINIBERT_PORTABLE."""
    global _forced
    _forced = on


def portable() -> bool:
    """True when CPU tensors must take the portable torch path instead of the C++ kernels."""
    if _forced is not None:
        return _forced
    return os.environ.get(ENV, "") not in ("", "0")


def uses_kernels(t: Tensor) -> bool:
    """True when `t` goes through the C++ kernels: a CPU tensor, portable path off."""
    return t.device.type == "cpu" and not portable()


@contextmanager
def portable_path(on: bool = True) -> Iterator[None]:
    """`use_portable(on)` for the block, then the previous setting back."""
    global _forced
    old = _forced
    _forced = on
    try:
        yield
    finally:
        _forced = old
