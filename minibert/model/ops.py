"""The model's CPU-fast building blocks: dropout (the fused kernel on CPU), and an embedding row
gather whose backward is one index_add_. Same math as torch's; why each is faster is said where it is."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minibert.model.kernels.dropout import drop_cut
from minibert.model.kernels.dropout import dropout as kernel_dropout
from minibert.model.portable import uses_kernels

# ---------------------------------------------------------------------------- dropout


def achieved_drop_prob(p: float) -> float:
    """The exact drop probability `dropout` implements on CPU for a requested `p`."""
    return drop_cut(p) / (1 << 16)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout; on CPU the fused kernel (minibert/model/kernels/dropout.py: mask drawn and applied
    in one pass, regenerated from its seed in backward, ~15x faster than a mask tensor), elsewhere
    (and on the portable path, minibert.model.portable) torch's own, drawing from torch's generator."""
    if not training or p == 0.0:
        return x
    if not uses_kernels(x):
        return F.dropout(x, p, True)
    return kernel_dropout(x, p)


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
