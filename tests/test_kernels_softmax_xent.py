"""minibert.model.kernels.softmax_xent: the in-place loss gradient and log-probabilities against float64
torch, the padding rows, underflow, and bad labels."""
from __future__ import annotations

import pytest
import torch

from minibert.model.kernels import build
from minibert.model.kernels.softmax_xent import reference_softmax_xent_, softmax_xent_

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


def test_bias_is_added_in_fp32_and_its_gradient_is_the_column_sum_over_real_rows():
    z, labels = case(torch.bfloat16)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 3
    logp_true, grad_true = float64_truth(z.double() + bias.double(), labels, REAL)  # bias never rounded
    g, grad_b = z.clone(), torch.full((V,), 0.5)  # accumulates: starts from a non-zero value
    logp = softmax_xent_(g, labels, REAL, bias, grad_b)
    torch.testing.assert_close(logp[:REAL].double(), logp_true, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g[:REAL].double(), grad_true, atol=8e-3, rtol=0)
    # the column sums of the unrounded fp32 gradient: padding rows add nothing
    torch.testing.assert_close(grad_b.double(), 0.5 + grad_true.sum(0), atol=1e-5, rtol=0)


def test_bias_path_equals_its_plain_torch_reference():
    z, labels = case(torch.float32, scale=10.0)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(2))
    a, b, gb_a, gb_b = z.clone(), z.clone(), torch.zeros(V), torch.zeros(V)
    torch.testing.assert_close(softmax_xent_(a, labels, REAL, bias, gb_a),
                               reference_softmax_xent_(b, labels, REAL, bias, gb_b), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(gb_a, gb_b, atol=1e-6, rtol=0)


def test_bias_gradient_has_the_same_bits_whatever_the_thread_count():
    rows = 101  # several 32-row tasks, the last one short
    g0 = torch.Generator().manual_seed(3)
    z, labels = torch.randn(rows, V, generator=g0).to(torch.bfloat16), torch.randint(0, V, (rows,), generator=g0)
    bias = torch.randn(V, generator=g0)
    threads, out = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            gb = torch.zeros(V)
            softmax_xent_(z.clone(), labels, rows - 4, bias, gb)
            out.append(gb)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
