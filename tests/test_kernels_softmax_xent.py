"""minibert.kernels.softmax_xent: the in-place loss gradient and log-probabilities against float64
torch, the padding rows, underflow, and bad labels."""
from __future__ import annotations

import pytest
import torch

from minibert.kernels import build
from minibert.kernels.softmax_xent import reference_softmax_xent_, softmax_xent_

pytestmark = pytest.mark.skipif(not build.load(), reason="C++ kernels unavailable (no compiler)")

ROWS, V, REAL = 13, 99, 11


def case(dtype, scale=4.0):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(ROWS, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (ROWS,), generator=g)
    return z, labels


def float64_truth(z, labels, n):
    logp = torch.log_softmax(z[:n].double(), -1)
    grad = logp.exp()
    grad[torch.arange(n), labels[:n]] -= 1
    return logp[torch.arange(n), labels[:n]], grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_gradient_and_log_probabilities_equal_float64_torch(dtype, tol):
    z, labels = case(dtype)
    logp_true, grad_true = float64_truth(z, labels, REAL)
    g = z.clone()
    logp = softmax_xent_(g, labels, REAL)
    assert logp.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(logp[:REAL].double(), logp_true, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g[:REAL].double(), grad_true, atol=tol, rtol=0)
    assert (g[REAL:] == 0).all() and (logp[REAL:] == 0).all()


def test_kernel_equals_its_plain_torch_reference():
    z, labels = case(torch.float32, scale=10.0)
    a, b = z.clone(), z.clone()
    torch.testing.assert_close(softmax_xent_(a, labels, REAL), reference_softmax_xent_(b, labels, REAL),
                               atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_underflowed_label_keeps_its_exact_finite_loss(dtype):
    z = torch.zeros(3, V, dtype=dtype)
    z[:, 5] = 150.0  # p[label 7] = exp(-150): zero in any float dtype
    labels = torch.tensor([7, 5, 7])
    logp = softmax_xent_(z.clone(), labels, 3)
    want = (z.double()[0, 7] - torch.logsumexp(z.double()[0], 0)).item()
    assert torch.isfinite(logp).all()
    assert logp[0].item() == pytest.approx(want, rel=1e-6) and logp[1].item() == pytest.approx(0.0, abs=1e-5)


def test_a_label_outside_the_vocabulary_is_an_error():
    z, labels = case(torch.float32)
    labels[2] = V
    with pytest.raises(RuntimeError, match="label 99 outside"):
        softmax_xent_(z, labels, REAL)
