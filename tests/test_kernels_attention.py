"""minibert.model.kernels.attention: the fused training attention against a per-pair loop in float64 written
here (each pair's real rows only, no padding at all), forward and gradient, both dtypes, odd sizes
(7 pairs, T = 13, 3 heads of 5), the dropout bits of the weights, filler rows, threads, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from minibert.model.bert import token_layout
from minibert.model.kernels import build
from minibert.model.kernels.attention import (
    attention_rows,
    reference_from_heads,
    reference_softmax_dropout,
    reference_to_heads,
)
from minibert.model.kernels.dropout import reference_keep

pytestmark = pytest.mark.skipif(not build.load(), reason="C++ kernels unavailable (no compiler)")

B, T, HEADS, DH = 7, 13, 3, 5
H = HEADS * DH
VALID = torch.tensor([13, 1, 6, 9, 13, 2, 11])


def per_pair(qkv: torch.Tensor, valid: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The book's attention pair by pair on its real rows only, float64; the weights' dropout keeps
    element ((b * heads + j) * T + query) * T + key of the (B, heads, T, T) weights (reference_keep)."""
    keep = reference_keep((B, HEADS, T, T), p, seed).double()
    out, start = [], 0
    for b, n in enumerate(valid.tolist()):
        rows = qkv[start:start + n].double()  # (n, 3H)
        heads = []
        for j in range(HEADS):
            q, k, v = (rows[:, c * H + j * DH:c * H + (j + 1) * DH] for c in range(3))  # (n, dh)
            w = torch.softmax(q @ k.T / math.sqrt(DH), dim=-1) * keep[b, j, :n, :n] / (1 - p)  # (n, n)
            heads.append(w @ v)
        out.append(torch.cat(heads, dim=1))  # (n, H): heads side by side, as W_o expects
        start += n
    return torch.cat(out)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = token_layout(VALID, T, bucket=False)  # real rows, row-major
    qkv = (torch.randn(len(idx), 3 * H, generator=g) * 1.5).to(dtype).requires_grad_()
    up = torch.randn(len(idx), H, generator=g)
    return qkv, idx, up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradient_equal_a_per_pair_loop(dtype):
    qkv, idx, up = inputs(dtype)
    out = attention_rows(qkv, idx, VALID, T, HEADS, 0.3, seed=17)
    x = qkv.detach().double().requires_grad_()
    ref = per_pair(x, VALID, 0.3, 17)
    tol = 1e-5 if dtype == torch.float32 else 4e-2  # bf16: q, k, v, the weights and the GEMMs rounded
    assert out.dtype == dtype and out.shape == (len(idx), H)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    (got,) = torch.autograd.grad(out, qkv, up.to(dtype))
    (want,) = torch.autograd.grad(ref, x, up.double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol * 2, rtol=tol * 2)


def test_the_plain_torch_path_computes_the_same():
    """What runs without a compiler: the reference functions, against the kernels, same seed."""
    qkv, idx, _ = inputs(torch.float32, seed=1)
    qkv = qkv.detach()
    q, k, v = reference_to_heads(qkv, idx, B, T, HEADS)
    w = reference_softmax_dropout(torch.bmm(q, k.transpose(1, 2)), VALID, HEADS, DH ** -0.5, 0.2, 5)
    torch.testing.assert_close(reference_from_heads(torch.bmm(w, v), idx, HEADS),
                               attention_rows(qkv, idx, VALID, T, HEADS, 0.2, seed=5), atol=1e-6, rtol=1e-6)
    k_ops = torch.ops.minibert.to_heads(qkv, idx, B, T, HEADS)
    for a, r in zip(k_ops, (q, k, v)):
        assert torch.equal(a, r)  # a pure layout change: bit for bit, zeros at pads


def test_filler_rows_at_pad_positions_leave_real_rows_alone():
    """Training rows are padded with pad positions (model.token_layout): a filler row's key is masked,
    so real rows come out as without it, and the filler's own output (a pad query) is zero."""
    qkv, idx, _ = inputs(torch.float32, seed=2)
    qkv = qkv.detach()
    pads = (~(torch.arange(T) < VALID[:, None])).flatten().nonzero().squeeze(1)[:5]  # (5,) pad positions
    filler = torch.randn(5, 3 * H) * 100
    out = attention_rows(torch.cat([qkv, filler]), torch.cat([idx, pads]), VALID, T, HEADS, 0.3, seed=9)
    torch.testing.assert_close(out[:len(idx)], attention_rows(qkv, idx, VALID, T, HEADS, 0.3, seed=9),
                               atol=1e-6, rtol=1e-6)
    assert (out[len(idx):] == 0).all()


def test_no_dropout_is_softmax_attention():
    qkv, idx, _ = inputs(torch.float32, seed=3)
    out = attention_rows(qkv.detach(), idx, VALID, T, HEADS, 0.0, seed=1)
    torch.testing.assert_close(out.double(), per_pair(qkv.detach(), VALID, 0.0, 1), atol=1e-5, rtol=1e-5)


def test_same_bits_whatever_the_thread_count():
    qkv, idx, up = inputs(torch.bfloat16, seed=4)
    runs, old = [], torch.get_num_threads()
    try:
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            x = qkv.detach().clone().requires_grad_()
            out = attention_rows(x, idx, VALID, T, HEADS, 0.2, seed=3)
            runs.append((out, torch.autograd.grad(out, x, up.bfloat16())[0]))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_bad_layouts_are_refused_with_a_message():
    qkv, idx, _ = inputs(torch.float32)
    qkv = qkv.detach()
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.minibert.to_heads(qkv, torch.full_like(idx, B * T), B, T, HEADS)
    with pytest.raises(RuntimeError, match="repeated"):
        torch.ops.minibert.to_heads(qkv, torch.zeros_like(idx), B, T, HEADS)
    scores = torch.zeros(B * HEADS, T, T)
    with pytest.raises(RuntimeError, match="valid_len 0"):
        torch.ops.minibert.softmax_dropout(scores, torch.zeros(B, dtype=torch.long), HEADS, 1.0, 0.1, 0)


def test_a_weight_whose_bits_equal_the_cut_is_kept():
    """The softmax-dropout boundary: p = bits / 2**16 puts the cut exactly on chosen (pair, head,
    query, key) weights inside the real rows; the documented rule (bits >= cut) keeps them, forward
    (the fused op's weight is prob / (1 - p), not 0) and through the whole attention against the
    float64 per-pair loop, gradient included."""
    from minibert.model.kernels.dropout import reference_bits

    qkv, idx, up = inputs(torch.float32, seed=6)
    seed, n = 41, B * HEADS * T * T
    all_bits = reference_bits(seed, 0, n)
    picks = [((0 * HEADS + 1) * T + 4) * T + 12, ((4 * HEADS + 2) * T + 12) * T + 0,
             ((6 * HEADS + 0) * T + 10) * T + 7]  # (b, head, query, key) all inside valid_lens
    for e in picks:
        cut = int(all_bits[e])
        assert 0 < cut < 65536
        p = cut / 65536
        scores = torch.randn(B * HEADS, T, T, generator=torch.Generator().manual_seed(e))
        prob, dropped = torch.ops.minibert.softmax_dropout(scores, VALID, HEADS, 0.5, p, seed)
        kept = prob.flatten()[e] * torch.tensor(1.0 / (1.0 - p))
        assert prob.flatten()[e] > 0 and dropped.flatten()[e] == kept, e
        x = qkv.detach().clone().requires_grad_()
        out = attention_rows(x, idx, VALID, T, HEADS, p, seed=seed)
        x64 = qkv.detach().double().requires_grad_()
        ref = per_pair(x64, VALID, p, seed)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=f"forward, element {e}")
        (got,) = torch.autograd.grad(out, x, up)
        (want,) = torch.autograd.grad(ref, x64, up.double())
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=f"gradient, element {e}")
