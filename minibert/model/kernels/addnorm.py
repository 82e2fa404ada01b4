"""Post-LN AddNorm, LayerNorm(x + dropout(y)), as one pass forward and one backward.

The residual sum is formed in fp32 (eager autocast rounds dropout(y) to bf16 first); y may be
float32 or bfloat16 (a Linear's output under autocast), x and the LayerNorm parameters float32,
the output float32 like autocast's layer_norm. Saved for backward: s = x + dropout(y) and the
row statistics; the mask is regenerated from the seed (minibert.model.kernels.dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minibert.model.kernels import build
from minibert.model.kernels.dropout import draw_seed, reference_keep
from minibert.model.portable import uses_kernels


def reference_add_norm(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, p: float, seed: int,
                       eps: float) -> Tensor:
    """Plain torch, same bits: F.layer_norm(x + y * (1 / (1 - p)) * keep) in fp32; differentiable; on y's device."""
    keep = reference_keep(y.shape, p, seed, y.device)
    s = x.float() + y.float() * torch.tensor(1.0 / (1.0 - p), device=y.device) * keep
    return F.layer_norm(s, (s.shape[-1],), weight.float(), bias.float(), eps)


def supported(y: Tensor, x: Tensor, weight: Tensor) -> bool:
    """The shapes and dtypes the C++ kernel takes (anything else runs the reference)."""
    return (uses_kernels(y) and x.dim() == 2 and y.shape == x.shape and x.dtype == torch.float32
            and y.dtype in (torch.float32, torch.bfloat16) and weight.dtype == torch.float32)


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, weight, bias, p, seed, eps):
        out, s, mean, rstd = torch.ops.minibert.add_norm(y.contiguous(), x.contiguous(), weight.contiguous(),
                                                         bias.contiguous(), p, seed, eps)
        ctx.save_for_backward(s, mean, rstd, weight)
        ctx.p, ctx.seed, ctx.y_dtype = p, seed, y.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        s, mean, rstd, weight = ctx.saved_tensors
        dy, dx, dw, db = torch.ops.minibert.add_norm_backward(dout.float().contiguous(), s, mean, rstd, weight,
                                                              ctx.y_dtype, ctx.p, ctx.seed)
        return dy, dx, dw, db, None, None, None


# torch.compile (train.compile) runs this eagerly: a graph break, the C++ kernel stays
@torch.compiler.disable
def add_norm(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, p: float, eps: float = 1e-5,
             seed: int | None = None) -> Tensor:
    """LayerNorm(x + dropout(y)) over the last dim in training mode; rows (N, H)."""
    seed = draw_seed() if seed is None else seed
    if supported(y, x, weight) and build.available():
        return _AddNorm.apply(y, x, weight, bias, p, seed, eps)
    return reference_add_norm(y, x, weight, bias, p, seed, eps)
