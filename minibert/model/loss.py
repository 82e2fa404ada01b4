"""The pretraining loss: MLM cross-entropy over real masked slots only, NSP cross-entropy.

d2l's code multiplies a *mean* cross-entropy by the slot weights, so padded prediction slots are
averaged in (d2l issue #2582); here the MLM loss is the mean over slots with weight > 0.
`linear_cross_entropy` fuses the MLM decoder with its loss so the (M, V) logits never exist whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minibert.model.kernels.softmax_xent import softmax_xent_


def pretrain_loss(mlm_logits: Tensor, mlm_labels: Tensor, mlm_weights: Tensor, nsp_logits: Tensor,
                  nsp_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(total, mlm, nsp) in fp32; MLM cross-entropy is the mean over real slots (weights > 0) only."""
    labels = mlm_labels[mlm_weights > 0].long()  # (M,), same mask and order as forward's
    mlm = F.cross_entropy(mlm_logits.float(), labels)
    nsp = F.cross_entropy(nsp_logits.float(), nsp_labels.long())
    return mlm + nsp, mlm, nsp


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ W.T + b` against `labels`, `CHUNK` rows at a time.

    The MLM decoder's logits are (M, V) = (~3500, 20256): three fp32 copies of them (logits,
    log-softmax, its gradient) were most of a CPU step's memory. Here each chunk's logits are made,
    turned into the loss *and* the gradient at once (softmax - onehot is known in the forward pass),
    multiplied into dL/dh and dL/dW (dL/db comes out of the softmax pass), and dropped. Same FLOPs as the plain path, ~40 MB instead of ~1 GB;
    backward only scales the stored gradients by the incoming scalar."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, dtype):
        M = h.shape[0]
        # Rows are padded to a multiple of GRAIN (zero rows, masked out below), so a chunk has one of
        # CHUNK / GRAIN sizes in every step: the allocator reuses those buffers and oneDNN its cached
        # matmul primitives, where an exact last chunk would bring a new size every step.
        padded = -M % GRAIN
        hp = F.pad(h.to(dtype), (0, 0, 0, padded))  # (M', H)
        labels = F.pad(labels, (0, padded))
        w = weight.to(dtype)  # (V, H)
        b = bias.detach().float().contiguous()  # (V,): added in fp32 inside the softmax pass
        need_grad = torch.is_grad_enabled() or any(ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(hp.shape, dtype=dtype, device=h.device) if need_grad else None
        grad_w = None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=h.device) if need_grad else None
        # One logits buffer for every chunk: a fresh (512, V) output per chunk made the bf16 decoder GEMM
        # 2.6x slower inside a step on an AMX Xeon (6.3 against 2.4 ms; oneDNN writing into new memory).
        logits = torch.empty((min(CHUNK, hp.shape[0]), w.shape[0]), dtype=dtype, device=h.device)  # (c, V)
        for s in range(0, M, CHUNK):
            hc, lab, n = hp[s:s + CHUNK], labels[s:s + CHUNK], min(CHUNK, M - s)
            # One in-place pass (minibert/model/kernels/softmax_xent.py): the bias-less logits get the bias
            # and become the gradient of the summed loss, softmax - onehot, in the matmul dtype (padding
            # rows zeroed), its column sums are added into dL/db, and log p[label] comes from an fp32
            # logsumexp, so a label whose probability underflows keeps a finite loss.
            g = torch.mm(hc, w.t(), out=logits[:hc.shape[0]])  # (c, V), in dtype
            loss -= softmax_xent_(g, lab, n, b, grad_b).sum()
            if need_grad:
                torch.mm(g, w, out=grad_h[s:s + CHUNK])  # (c, H)
                if grad_w is None:
                    grad_w = (g.t() @ hc).float()  # (V, H), accumulated in fp32
                elif dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)  # summed inside the GEMM: no (V, H) temporary, no extra pass
                else:
                    grad_w.add_(g.t() @ hc)  # the bf16 product added into fp32 directly (no fp32 copy)
        if need_grad and grad_w is None:  # no slots at all
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(grad_h[:M] if need_grad else None, grad_w, grad_b)
        ctx.dtypes, ctx.M = (h.dtype, weight.dtype, bias.dtype), M
        return loss / M

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        scale = grad_out / ctx.M
        return (grad_h * scale).to(dh), (grad_w * scale).to(dw), (grad_b * scale).to(db), None, None


CHUNK = 512  # rows of logits alive at once: 512 x 20256 x 2 B = 21 MB in bf16
GRAIN = 128  # chunk sizes are multiples of this


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """`F.cross_entropy(F.linear(h, weight, bias).float(), labels)` without the (M, V) tensors;
    the matmuls run in the autocast dtype when autocast is on, like `F.linear` would."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, labels, dtype)
