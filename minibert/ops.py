"""The model's CPU-fast building blocks: dropout from cheap random bits, and an embedding row
gather whose backward is one index_add_. Same math as torch's; why each is faster is said where it is."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------- dropout


def drop_threshold(p: float) -> int:
    """int16 cut: an element survives when its 16 random bits (as int16) are >= this value."""
    return -(1 << 15) + round(p * (1 << 16))


def achieved_drop_prob(p: float) -> float:
    """The exact drop probability `dropout` implements for a requested `p`."""
    return round(p * (1 << 16)) / (1 << 16)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool mask, True with probability 1 - achieved_drop_prob(p), from the global torch generator."""
    n = math.prod(shape)
    # One 64-bit draw feeds four elements: the RNG, not the compare, is what costs on CPU.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    bits = words.view(torch.int16)[:n].view(shape)  # 16 uniform random bits per element
    return bits >= drop_threshold(p)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout; on CPU with the cheap bit mask, elsewhere torch's fused kernel."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    # Why a scale tensor in x's dtype and not `where(mask, x, 0)`: on CPU, ops that mix bool with
    # bf16/fp32 (where, masked_fill, x * mask) take a slow unvectorised path (~13 ns/element), while
    # bool -> uint8 (a free view) -> x.dtype and a same-dtype multiply are vectorised (~1 ns/element).
    # Autograd keeps only `scale` (x does not need saving): backward is one multiply too.
    scale = keep_mask(x.shape, p, x.device).view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale


# ---------------------------------------------------------------------------- embedding lookup


class _GatherRows(torch.autograd.Function):
    """`table[ids]` whose backward is one `index_add_` into a zero table.

    Autograd's own backward of an embedding lookup is ~10x slower on CPU for (N, H) = (24k, 128):
    indexing backward is an accumulating index_put (9.9 ms for a 128-row table), and
    embedding_dense_backward sorts the ids (2-4 ms). index_add_ is 0.3 ms."""

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = table.shape[0]
        return table.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, ids, grad), None


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """(R, H) table, (N,) int64 ids -> (N, H) rows; gradient accumulated with index_add_."""
    return _GatherRows.apply(table, ids)
