"""Dropout whose mask is a pure function of (seed, element index): one pass forward, one backward.

Element i survives when 16 bits of splitmix64 word i // 4 are >= round(p * 2**16) (csrc/bits.h), so
the achieved drop probability is round(p * 2**16) / 2**16 (p = 0.2 -> 0.19999695) and kept values
are scaled by 1 / (1 - p) in fp32. The seed is one draw from torch's global generator, which the
training loop reseeds every step: runs stay reproducible and resume bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minibert.model.kernels import build
from minibert.model.portable import uses_kernels

GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def draw_seed() -> int:
    """One 63-bit seed from torch's global CPU generator."""
    return int(torch.empty((), dtype=torch.int64).random_())


def drop_cut(p: float) -> int:
    """An element is kept when its 16 random bits are >= this."""
    return round(p * (1 << 16))


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def reference_bits(seed: int, first: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """The 16-bit draws of elements [first, first + n) as int32 (n,) on `device` (default CPU), in plain
    torch int64 ops (int64 tensors hold the uint64 bit patterns; multiplication wraps mod 2**64 like uint64's)."""
    w0, w1 = first >> 2, (first + n + 3) >> 2
    j = torch.arange(w0, w1, dtype=torch.int64, device=device)
    z = (j + 1) * _signed(GOLDEN) + _signed(seed)  # wraps like uint64
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    parts = torch.stack([_shr(z, 16 * t) & 0xFFFF for t in range(4)], 1).flatten()  # (4 words,)
    return parts[first & 3:(first & 3) + n].to(torch.int32)


def reference_keep(shape, p: float, seed: int, device: torch.device | str | None = None) -> Tensor:
    """fp32 0/1 mask of `shape` (elements in row-major order) on `device` (default CPU)."""
    n = 1
    for s in shape:
        n *= s
    return (reference_bits(seed, 0, n, device) >= drop_cut(p)).float().view(shape)


def reference_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """x * (1 / (1 - p)) * keep, computed in fp32 and rounded once to x's dtype; on x's device."""
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32, device=x.device)
    return (x.float() * scale * reference_keep(x.shape, p, seed, x.device)).to(x.dtype)


def _apply(x: Tensor, p: float, seed: int) -> Tensor:
    if x.dtype in (torch.float32, torch.bfloat16) and uses_kernels(x) and build.available():
        return torch.ops.minibert.dropout(x.contiguous(), p, seed)
    return reference_dropout(x.contiguous(), p, seed)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return _apply(x, p, seed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _apply(grad, ctx.p, ctx.seed), None, None  # same mask, same scale: nothing was saved


# torch.compile (train.compile) runs this eagerly: a graph break, the C++ kernel stays
@torch.compiler.disable
def dropout(x: Tensor, p: float, seed: int | None = None) -> Tensor:
    """Training-mode dropout of a CPU tensor (seed: drawn when None); the kernel takes float32 and
    bfloat16, other dtypes run the reference."""
    return _Dropout.apply(x, p, draw_seed() if seed is None else seed)
