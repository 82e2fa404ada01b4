"""What runs where no C++ compiler is found (minibert.model.kernels.build.available() False): the attention,
AddNorm and the MLM softmax cross-entropy through their plain-torch paths, against float64 written
out in the tests (the attention's per-pair loop, LayerNorm of x + y / (1 - p) * keep with the
documented keep rule, log_softmax), forward and gradient. Needs no compiler, so it runs everywhere.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from minibert.model.kernels import build
from minibert.model.kernels.addnorm import add_norm
from minibert.model.kernels.attention import attention_rows
from minibert.model.kernels.dropout import drop_cut, reference_bits
from minibert.model.kernels.softmax_xent import softmax_xent_
from tests.test_kernels_attention import HEADS, VALID, T, per_pair
from tests.test_kernels_attention import inputs as attention_inputs
from tests.test_kernels_softmax_xent import REAL, case, float64_truth


@pytest.fixture
def no_compiler(monkeypatch):
    """The kernels as on a machine without c++: available() is False (its one warning silenced)."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not build.available()
        yield


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_without_a_compiler_is_the_per_pair_loop(no_compiler, p):
    """1/sqrt(dh) with dh the head width (5 here, heads * dh = 15 would scale by 1/sqrt(15))."""
    qkv, idx, up = attention_inputs(torch.float32, seed=8)
    out = attention_rows(qkv, idx, VALID, T, HEADS, p, seed=13)
    x = qkv.detach().double().requires_grad_()
    ref = per_pair(x, VALID, p, 13)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad(out, qkv, up)
    (want,) = torch.autograd.grad(ref, x, up.double())
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_without_a_compiler_is_layer_norm_of_the_dropped_sum(no_compiler, dtype):
    n, h, p, seed = 99, 37, 0.3, 21
    g = torch.Generator().manual_seed(5)
    y = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    x = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.rand(h, generator=g) + 0.5).requires_grad_()
    b = torch.randn(h, generator=g).requires_grad_()
    up = torch.randn(n, h, generator=g)
    keep = (reference_bits(seed, 0, n * h) >= drop_cut(p)).double().view(n, h)  # kept when bits >= cut
    args64 = [t.detach().double().requires_grad_() for t in (y, x, w, b)]
    y64, x64, w64, b64 = args64
    want = F.layer_norm(x64 + y64 / (1 - p) * keep, (h,), w64, b64, 1e-5)
    out = add_norm(y, x, w, b, p, 1e-5, seed=seed)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out, (y, x, w, b), up)
    ref = torch.autograd.grad(want, args64, up.double())
    for name, a, r in zip("yxwb", got, ref):
        tol = 1e-4 if a.dtype == torch.float32 else 2e-2  # dy in bf16: one rounding
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_softmax_xent_without_a_compiler_is_float64_log_softmax(no_compiler, dtype, tol):
    z, labels = case(dtype)
    bias = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(4))
    logp_true, grad_true = float64_truth(z.double() + bias.double(), labels, REAL)
    grad_bias = torch.zeros(z.shape[1])
    g = z.clone()
    logp = softmax_xent_(g, labels, REAL, bias, grad_bias)
    torch.testing.assert_close(logp[:REAL].double(), logp_true, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g[:REAL].double(), grad_true, atol=tol, rtol=0)
    torch.testing.assert_close(grad_bias.double(), grad_true.sum(0), atol=1e-5, rtol=1e-5)
    assert (g[REAL:] == 0).all() and (logp[REAL:] == 0).all()
