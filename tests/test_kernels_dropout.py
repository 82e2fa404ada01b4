"""minibert.model.kernels.dropout: the C++ kernel against the published splitmix64 stream, a plain-torch
reference (forward and gradient), the drop rate, and independence from the thread count."""
from __future__ import annotations

import math

import pytest
import torch

from minibert.model.kernels import build
from minibert.model.kernels.dropout import dropout, reference_bits, reference_dropout
from minibert.model.ops import achieved_drop_prob

pytestmark = pytest.mark.skipif(not build.load(), reason="C++ kernels unavailable (no compiler)")

# splitmix64 seeded with 1234567: the first outputs of Vigna's reference implementation (splitmix64.c)
SPLITMIX64_1234567 = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                      4593380528125082431, 16408922859458223821]


def words(bits16: list[int]) -> list[int]:
    return [sum(bits16[4 * j + t] << (16 * t) for t in range(4)) for j in range(len(bits16) // 4)]


def test_bits_are_the_published_splitmix64_stream():
    assert words(torch.ops.minibert.dropout_bits(1234567, 0, 20).tolist()) == SPLITMIX64_1234567
    assert words(reference_bits(1234567, 0, 20).tolist()) == SPLITMIX64_1234567


@pytest.mark.parametrize("first,n", [(0, 99), (13, 37), (3, 1), (8191, 8195)])
def test_kernel_bits_equal_the_plain_torch_reference_at_any_offset(first, n):
    seed = 2**62 + 12345  # large seeds wrap like uint64 in both
    assert torch.equal(torch.ops.minibert.dropout_bits(seed, first, n), reference_bits(seed, first, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradient_equal_the_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 7, 99, generator=g).to(dtype).requires_grad_()
    up = torch.randn(13, 7, 99, generator=g).to(dtype)
    out = dropout(x, 0.3, seed=77)
    ref = reference_dropout(x, 0.3, 77)
    assert torch.equal(out, ref)
    (gx,) = torch.autograd.grad(out, x, up)
    (gr,) = torch.autograd.grad(ref, x, up)
    assert torch.equal(gx, gr)


def test_drop_rate_scale_and_pair_independence():
    """Rate within 5 sigma of round(p * 2**16) / 2**16; kept values exactly x / (1 - p); two
    neighbours (sharing one 64-bit word) both dropped at rate p^2 — a word reused for its four
    elements would give p."""
    p, n = 0.2, 2_000_000
    y = dropout(torch.ones(n), p, seed=5)
    assert set(y.unique().tolist()) == {0.0, 1 / (1 - p)}
    dropped = y == 0
    q = achieved_drop_prob(p)
    assert abs(q - p) < 1e-4
    assert abs(dropped.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    both = (dropped[0::2] & dropped[1::2]).float().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n // 2))


def test_same_bits_whatever_the_thread_count():
    x = torch.randn(300_001)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dropout(x, 0.2, seed=9)
        torch.set_num_threads(max(2, old))
        many = dropout(x, 0.2, seed=9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_seed_comes_from_the_global_generator():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_bad_input_is_refused_by_the_kernel():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.minibert.dropout(torch.ones(4, dtype=torch.float64), 0.1, 0)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        torch.ops.minibert.dropout(torch.ones(4), 1.0, 0)


def boundary_elements(seed: int, n: int, picks) -> list[tuple[int, int]]:
    """(element, its 16 bits) for the elements `picks` of the stream (seed, 0..n): the bits come
    from reference_bits, which test_bits_are_the_published_splitmix64_stream pins to splitmix64.c."""
    bits = reference_bits(seed, 0, n)
    chosen = [(e, int(bits[e])) for e in picks]
    assert all(0 < b < 1 << 16 for _, b in chosen)  # a usable cut: 0 < p < 1
    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_element_whose_bits_equal_the_cut_is_kept(dtype):
    """The documented rule keeps an element when its 16 bits are >= the cut. A random mask meets an
    element sitting exactly on the cut once in 65536, so the boundary is forced here: p = bits / 2**16
    puts the cut on a chosen element's bits, which must come out kept, forward and backward."""
    seed, n = 77, 13 * 7 * 99
    all_bits = reference_bits(seed, 0, n)
    x = torch.randn(13, 7, 99, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    for e, cut in boundary_elements(seed, n, (0, 1234, 4999, n - 1)):
        p = cut / 65536
        keep = (all_bits >= cut).float().view(x.shape)  # the rule, written out here
        want = (x.detach().float() * torch.tensor(1.0 / (1.0 - p)) * keep).to(dtype)
        out = dropout(x, p, seed=seed)
        assert out.flatten()[e] != 0 and torch.equal(out, want), (e, cut)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert gx.flatten()[e] != 0 and torch.equal(gx, (torch.tensor(1.0 / (1.0 - p)) * keep).to(dtype)), e


def test_the_reported_boundary_element_is_kept():
    """The case found by hand (issue 33): seed 77, p 0.3: element 19861's bits are 19661, the cut."""
    assert int(reference_bits(77, 19861, 1)) == round(0.3 * 65536) == 19661
    out = dropout(torch.ones(20000), 0.3, seed=77)
    assert out[19861] == torch.tensor(1 / 0.7)
