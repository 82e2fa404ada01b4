"""glibc heap settings for CPU training: keep big freed blocks resident while training, give them back
once it is over. Both return False, doing nothing, where the C library is not glibc."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc malloc.h


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_cpu_malloc(keep_bytes: int = 1 << 32) -> bool:
    """Make glibc keep freed big blocks instead of unmapping them; True if it took effect.

    A step allocates and frees many multi-MB tensors (activations, loss chunks). By default glibc serves
    those with mmap and unmaps them on free, so every step pays fresh page faults on them (measured:
    2.7x slower steps). Call once, before the first big allocation."""
    try:
        libc, keep = _libc(), min(keep_bytes, (1 << 31) - 1)
        return all([libc.mallopt(M_MMAP_THRESHOLD, keep) == 1, libc.mallopt(M_TRIM_THRESHOLD, keep) == 1,
                    libc.mallopt(M_TOP_PAD, 64 << 20) == 1])
    except (OSError, AttributeError):
        return False


def release_cpu_memory() -> bool:
    """Hand the C heap's free pages back to the OS (malloc_trim); True if any were released.

    With tune_cpu_malloc's thresholds, memory freed after training stays resident; what comes after
    (plots, the MLflow model export) would then add to the peak instead of reusing it."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False
