"""Training attention over unpadded rows with its memory-bound steps fused (csrc/attention.cpp).

`attention_rows(qkv, idx, valid_lens, heads, p)` takes the fused projection of the N real rows,
qkv (N, 3H), and returns the context rows (N, H) before W_o. Only the two batched GEMMs (Q K^T and
P V) run as torch ops; around them three single-pass kernels replace eager chains:
- `to_heads`: rows -> head-major padded q, k, v (B*h, T, dh), zeros at pads (eager: a zero fill, an
  index_copy, a permute copy each; backward a stack, a permute copy and an index_select);
- `softmax_dropout`: key-padding mask, 1/sqrt(dh) scale, fp32 softmax and dropout of the weights in one
  pass, the mask regenerated from its seed in backward (minibert.model.kernels.dropout's bits, at the element
  index of the (B, h, T, T) weights); pad query rows come out as zeros (no loss reads them);
- `from_heads`: context (B*h, T, dh) -> rows (N, H) (eager: a transpose copy and an index_select).
Each has a plain-torch reference (`reference_*`) computing the same values; the tests compare both,
forward and gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minibert.model.kernels import build
from minibert.model.kernels.dropout import draw_seed, reference_keep
from minibert.model.portable import uses_kernels

# ---------------------------------------------------------------------------- plain-torch references


def reference_to_heads(qkv: Tensor, idx: Tensor, B: int, T: int, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> q, k, v (B*h, T, dh); zeros at pad positions."""
    N, H3 = qkv.shape
    padded = qkv.new_zeros(B * T, H3).index_copy(0, idx, qkv)  # (B*T, 3H), zeros at pads
    dh = H3 // 3 // heads
    q, k, v = padded.view(B, T, 3, heads, dh).permute(2, 0, 3, 1, 4).reshape(3, B * heads, T, dh).unbind(0)
    return q, k, v


def reference_from_heads(ctx: Tensor, idx: Tensor, heads: int) -> Tensor:
    Bh, T, dh = ctx.shape
    rows = ctx.view(Bh // heads, heads, T, dh).transpose(1, 2).reshape(-1, heads * dh)  # (B*T, H)
    return rows.index_select(0, idx)  # (N, H)


def reference_softmax_dropout(scores: Tensor, valid_lens: Tensor, heads: int, scale: float, p: float,
                              seed: int) -> Tensor:
    """The dropped weights (B*h, T, T) in fp32 math, rounded once to the scores' dtype; differentiable."""
    Bh, T, Tk = scores.shape
    lens = valid_lens.long().repeat_interleave(heads)[:, None, None]  # (B*h, 1, 1)
    keys = torch.arange(Tk, device=scores.device)[None, None, :] < lens  # (B*h, 1, Tk)
    queries = torch.arange(T, device=scores.device)[None, :, None] < lens  # (B*h, T, 1)
    x = (scores.float() * scale).masked_fill(~keys, float("-inf"))
    prob = torch.softmax(x, dim=-1) * queries  # pad query rows: zeros
    keep = reference_keep(scores.shape, p, seed, scores.device)
    return (prob * keep * torch.tensor(1.0 / (1.0 - p), device=scores.device)).to(scores.dtype)


# ---------------------------------------------------------------------------- autograd wrappers


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, idx, B, T, heads):
        ctx.save_for_backward(idx)
        ctx.heads = heads
        return torch.ops.minibert.to_heads(qkv.contiguous(), idx, B, T, heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (idx,) = ctx.saved_tensors
        # dk arrives as the transpose of Q K^T's contiguous (B*h, dh, T) gradient: no copy needed
        grads = [g.contiguous() for g in (dq, dk.transpose(1, 2), dv)]
        return torch.ops.minibert.to_heads_backward(*grads, idx, ctx.heads), None, None, None, None


class _FromHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn_out, idx, heads):
        ctx.save_for_backward(idx)
        ctx.shape = attn_out.shape
        ctx.heads = heads
        return torch.ops.minibert.from_heads(attn_out.contiguous(), idx, heads)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        Bh, T, _ = ctx.shape
        out = torch.ops.minibert.from_heads_backward(grad.contiguous(), idx, Bh // ctx.heads, T, ctx.heads)
        return out, None, None


class _SoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, valid_lens, heads, scale, p, seed):
        prob, dropped = torch.ops.minibert.softmax_dropout(scores.contiguous(), valid_lens, heads, scale, p, seed)
        ctx.save_for_backward(prob, valid_lens)
        ctx.args = heads, scale, p, seed
        return dropped

    @staticmethod
    def backward(ctx, grad):
        prob, valid_lens = ctx.saved_tensors
        d = torch.ops.minibert.softmax_dropout_backward(grad.contiguous(), prob, valid_lens, *ctx.args)
        return d, None, None, None, None, None


def supported(qkv: Tensor) -> bool:
    return uses_kernels(qkv) and qkv.dtype in (torch.float32, torch.bfloat16) and build.available()


# torch.compile (train.compile) runs this eagerly: a graph break, the C++ kernels stay
@torch.compiler.disable
def attention_rows(qkv: Tensor, idx: Tensor, valid_lens: Tensor, T: int, heads: int, p: float,
                   seed: int | None = None) -> Tensor:
    """Training-mode multi-head attention of the real rows: qkv (N, 3H) -> context (N, H) (before W_o).

    `idx` (N,) holds each row's flat padded position b * T + t, `valid_lens` (B,) the real lengths: keys
    past a pair's length are masked; dropout `p` falls on the attention weights."""
    B, dh = valid_lens.numel(), qkv.shape[1] // 3 // heads
    seed = (draw_seed() if p > 0 else 0) if seed is None else seed  # p = 0 keeps the global RNG as it was
    valid_lens = valid_lens.long().contiguous()
    if supported(qkv):
        q, k, v = _ToHeads.apply(qkv, idx, B, T, heads)  # 3 x (B*h, T, dh)
        weights = _SoftmaxDropout.apply(torch.bmm(q, k.transpose(1, 2)), valid_lens, heads, dh ** -0.5, p,
                                        seed)  # (B*h, T, T)
        return _FromHeads.apply(torch.bmm(weights, v), idx, heads)  # (N, H)
    q, k, v = reference_to_heads(qkv, idx, B, T, heads)
    weights = reference_softmax_dropout(torch.bmm(q, k.transpose(1, 2)), valid_lens, heads, dh ** -0.5, p, seed)
    return reference_from_heads(torch.bmm(weights, v), idx, heads)
