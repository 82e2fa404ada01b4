"""The vocabulary softmax of the MLM loss as one in-place pass per row (csrc/softmax_xent.cpp).

`softmax_xent_(z, labels, n, bias, grad_bias)` turns a chunk of bias-less logits z (c, V) into the
loss gradient softmax(z + bias) - onehot(label) in place (rows >= n: padding, zeroed), adds that
gradient's column sums (dL/dbias) into `grad_bias`, and returns log p[label] (c,) in fp32, computed as
z[label] - logsumexp(z): exact, so a label whose probability underflows in z's dtype still gets its
finite loss. The bias is added in fp32 inside the pass, so the decoder GEMM keeps K = hidden (a ones
column for the bias made K = 129, which oneDNN's bf16 kernels run 15-25 % slower). Eager torch needs a
broadcast add, a softmax, a gather, a log, a scatter, a fill, a column sum and a logsumexp fallback
for the underflowed rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minibert.model.kernels import build
from minibert.model.portable import uses_kernels


def reference_softmax_xent_(z: Tensor, labels: Tensor, n: int, bias: Tensor | None = None,
                            grad_bias: Tensor | None = None) -> Tensor:
    """Plain torch, fp32 inside: the same results written into `z` and added into `grad_bias`;
    returns log p[label] (c,)."""
    rows = torch.arange(n, device=z.device)
    logits = z[:n].float() if bias is None else z[:n].float() + bias.float()  # (n, V)
    logp_all = torch.log_softmax(logits, dim=-1)  # (n, V)
    g = logp_all.exp()
    g[rows, labels[:n]] -= 1.0
    if grad_bias is not None:
        grad_bias += g.sum(0)
    logp = torch.zeros(len(z), dtype=torch.float32, device=z.device)
    logp[:n] = logp_all[rows, labels[:n]]
    z[:n] = g.to(z.dtype)
    z[n:] = 0
    return logp


# torch.compile (train.compile) runs this eagerly: a graph break, the C++ kernel stays
@torch.compiler.disable
def softmax_xent_(z: Tensor, labels: Tensor, n: int, bias: Tensor | None = None,
                  grad_bias: Tensor | None = None) -> Tensor:
    """In place: z (c, V) -> softmax(z + bias) - onehot(labels), rows >= n zeroed, its column sums
    added into grad_bias (fp32, (V,)); returns log p[label] (c,). bias and grad_bias are optional."""
    fp32_vec = all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in (bias, grad_bias))
    if (uses_kernels(z) and z.dtype in (torch.float32, torch.bfloat16) and z.is_contiguous()
            and fp32_vec and build.available()):
        return torch.ops.minibert.softmax_xent_(z, labels.long().contiguous(), n, bias, grad_bias)
    return reference_softmax_xent_(z, labels, n, bias, grad_bias)
