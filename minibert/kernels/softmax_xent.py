"""The vocabulary softmax of the MLM loss as one in-place pass per row (csrc/softmax_xent.cpp).

`softmax_xent_(z, labels, n)` turns a chunk of logits z (c, V) into the loss gradient
softmax(z) - onehot(label) in place (rows >= n: padding, zeroed) and returns log p[label] (c,) in
fp32, computed as z[label] - logsumexp(z): exact, so a label whose probability underflows in z's
dtype still gets its finite loss. Eager torch needs a softmax, a gather, a log, a scatter, a fill
and a logsumexp fallback for the underflowed rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minibert.kernels import build


def reference_softmax_xent_(z: Tensor, labels: Tensor, n: int) -> Tensor:
    """Plain torch, fp32 inside: the same results written into `z`; returns log p[label] (c,)."""
    rows = torch.arange(n, device=z.device)
    logp_all = torch.log_softmax(z[:n].float(), dim=-1)  # (n, V)
    g = logp_all.exp()
    g[rows, labels[:n]] -= 1.0
    logp = torch.zeros(len(z), dtype=torch.float32, device=z.device)
    logp[:n] = logp_all[rows, labels[:n]]
    z[:n] = g.to(z.dtype)
    z[n:] = 0
    return logp


# torch.compile (train.compile) runs this eagerly: a graph break, the C++ kernel stays
@torch.compiler.disable
def softmax_xent_(z: Tensor, labels: Tensor, n: int) -> Tensor:
    """In place: z (c, V) -> softmax(z) - onehot(labels), rows >= n zeroed; returns log p[label] (c,)."""
    if (z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16) and z.is_contiguous()
            and build.available()):
        return torch.ops.minibert.softmax_xent_(z, labels.long().contiguous(), n)
    return reference_softmax_xent_(z, labels, n)
