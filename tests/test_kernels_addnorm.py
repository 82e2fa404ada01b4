"""minibert.model.kernels.addnorm: LayerNorm(x + dropout(y)) against plain torch (forward and gradients),
odd sizes so a transposed row/column fails, both y dtypes, and thread-count independence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minibert.model.kernels import build
from minibert.model.kernels.addnorm import add_norm, reference_add_norm
from minibert.model.kernels.dropout import dropout

pytestmark = pytest.mark.skipif(not build.load(), reason="C++ kernels unavailable (no compiler)")

N, H = 99, 37


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    x = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.rand(H, generator=g) + 0.5).requires_grad_()
    b = torch.randn(H, generator=g).requires_grad_()
    return y, x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_equal_plain_torch(dtype):
    y, x, w, b = inputs(dtype)
    up = torch.randn(N, H, generator=torch.Generator().manual_seed(1))
    out = add_norm(y, x, w, b, 0.3, 1e-5, seed=11)
    ref = reference_add_norm(y, x, w, b, 0.3, 11, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out, (y, x, w, b), up)
    want = torch.autograd.grad(ref, (y, x, w, b), up)
    for name, a, r in zip("yxwb", got, want):
        assert a.dtype == r.dtype, name
        tol = 1e-5 if a.dtype == torch.float32 else 1e-2  # dy in bf16: one rounding
        torch.testing.assert_close(a.float(), r.float(), atol=tol, rtol=tol, msg=name)


def test_mask_is_the_dropout_kernels_mask():
    """Same seed, same elements dropped as `dropout` of y alone: the AddNorm with LayerNorm undone
    (w = 1, b = 0, then de-normalised with the row statistics) is x + dropout(y)."""
    y, x, _, _ = inputs(torch.float32)
    y, x = y.detach(), x.detach()
    out = add_norm(y, x, torch.ones(H), torch.zeros(H), 0.4, 0.0, seed=5)
    s = x + dropout(y, 0.4, seed=5)
    torch.testing.assert_close(out, F.layer_norm(s, (H,), eps=0.0), atol=1e-5, rtol=1e-5)


def test_no_dropout_is_the_books_add_norm():
    y, x, w, b = inputs(torch.float32)
    out = add_norm(y, x, w, b, 0.0, 1e-5)
    torch.testing.assert_close(out, F.layer_norm(y + x, (H,), w, b, 1e-5), atol=1e-5, rtol=1e-5)


def test_same_bits_whatever_the_thread_count():
    y, x, w, b = inputs(torch.bfloat16, seed=3)
    y, x, w, b = (t.detach().repeat(40, 1) if t.dim() == 2 else t.detach() for t in (y, x, w, b))
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            args = [t.clone().requires_grad_() for t in (y, x, w, b)]
            out = add_norm(*args, 0.2, 1e-5, seed=8)
            runs.append([out] + list(torch.autograd.grad(out, args, torch.ones_like(out))))
    finally:
        torch.set_num_threads(old)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_unsupported_dtypes_take_the_reference():
    y, x, w, b = (t.detach().double() for t in inputs(torch.float32))
    out = add_norm(y, x, w, b, 0.3, 1e-5, seed=2)  # float64 x: not the kernel's
    assert torch.equal(out, reference_add_norm(y, x, w, b, 0.3, 2, 1e-5))


def test_an_element_whose_bits_equal_the_cut_is_kept():
    """dropout(y)'s boundary inside the fused AddNorm, forward and backward: p = bits / 2**16 puts the
    cut exactly on a chosen element (kept by the documented rule, bits >= cut); expectation in float64
    from the rule written out here."""
    from minibert.model.kernels.dropout import reference_bits

    y, x, w, b = inputs(torch.float32, seed=4)
    seed, all_bits = 31, reference_bits(31, 0, N * H)
    up = torch.randn(N, H, generator=torch.Generator().manual_seed(2))
    for e in (0, 1711, N * H - 1):
        cut = int(all_bits[e])
        assert 0 < cut < 65536
        p = cut / 65536
        keep = (all_bits >= cut).double().view(N, H)
        args64 = [t.detach().double().requires_grad_() for t in (y, x, w, b)]
        y64, x64, w64, b64 = args64
        want = F.layer_norm(x64 + y64 / (1 - p) * keep, (H,), w64, b64, 1e-5)
        out = add_norm(y, x, w, b, p, 1e-5, seed=seed)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5, msg=f"forward, element {e}")
        got = torch.autograd.grad(out, (y, x, w, b), up)
        ref = torch.autograd.grad(want, args64, up.double())
        for name, a, r in zip("yxwb", got, ref):
            torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-5, msg=f"d{name}, element {e}")
        assert got[0].flatten()[e] != 0  # kept: y's gradient flows through the boundary element
