"""The matmuls of one training step, replayed alone: how fast the step could be if only its GEMMs took time.
Used by bench.train (its "GEMM ms" and "GEMM-bound MFU" columns).

The MFU of bench.train divides by a peak measured on large square GEMMs (1024^3 and up). A training
step's GEMMs are not square: the book's model has hidden 128, so most of them have one dimension of 128
(K = 128 in the decoder's forward, N = 128 in W_o, FFN-out and the embedding gradients), and the
attention's are 1024 batched 64 x 64 x 64 products. oneDNN runs those far below the square peak (on an AMX
Xeon, 2026-12-06: W_qkv's weight gradient (384, 24576) x (24576, 128) at ~38 % of it, the attention's batched
products at ~17 %), so that peak cannot be reached by removing what is not a GEMM.

`capture(fn)` records every aten mm / addmm / bmm / baddbmm call `fn` makes, `out=` and in-place forms
too, forward and backward (the CPU autograd engine runs on the calling thread, under the same dispatch
mode), with its operands' shapes,
strides and dtypes; `replay(calls)` runs each again on fresh operands of exactly that layout (transposed
views stay transposed) and keeps its best of `repeats` runs. The sum is the step's GEMM-only time: its
FLOPs over that time, over the matmul peak, is the highest MFU these shapes allow with this torch and
oneDNN ("GEMM-bound MFU" in bench.train's table).
"""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# every overload a step reaches (`out=` and in-place ones included), replayed as its functional form
GEMM_OPS = {aten.mm.default: aten.mm.default, aten.mm.out: aten.mm.default,
            aten.addmm.default: aten.addmm.default, aten.addmm.out: aten.addmm.default,
            aten.addmm_.default: aten.addmm.default, aten.bmm.default: aten.bmm.default,
            aten.bmm.out: aten.bmm.default, aten.baddbmm.default: aten.baddbmm.default,
            aten.baddbmm_.default: aten.baddbmm.default}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMM_OPS:
            specs = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a
                          for a in args)
            self.calls.append((GEMM_OPS[func], specs))
        return func(*args, **(kwargs or {}))


def capture(fn) -> list[tuple]:
    """The GEMM calls `fn()` makes, in order: (aten op, operand specs (shape, stride, dtype) or scalars)."""
    rec = _Recorder()
    with rec:
        fn()
    return rec.calls


def _operand(spec, g: torch.Generator):
    if not isinstance(spec, tuple):
        return spec
    shape, stride, dtype = spec
    # the storage a strided view needs: 1 + sum((size - 1) * stride); a view of it keeps the call's layout
    need = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    base = torch.randn(max(need, 1), generator=g).to(dtype)
    return base.as_strided(shape, stride)


def flops(func, specs) -> float:
    """2 x multiply-adds of one captured call."""
    a, b = _mats(func, specs)
    if len(a) == 3:  # (batch, n, k) x (batch, k, m)
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 2.0 * a[0] * a[1] * b[1]


def _mats(func, specs) -> tuple[tuple, tuple]:
    """The two multiplied operands' shapes (addmm/baddbmm: the first operand is the added one)."""
    mats = [s[0] for s in specs if isinstance(s, tuple)]
    return (mats[1], mats[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (mats[0], mats[1])


FLUSH_BYTES = 32 << 20  # > the L2 of 2 cores on every kind we have seen (2 x 2 MB here); the L3 keeps operands, as in a step


def replay(calls: list[tuple], repeats: int = 3) -> dict:
    """Each call timed alone on fresh operands of its layout, best of `repeats` (after one warm-up run):
    {"gemm_ms": sum of the bests, "gemm_gflop": their FLOPs, "calls": n, "by_shape": top shapes by time}."""
    g = torch.Generator().manual_seed(0)
    total, work, by_shape = 0.0, 0.0, {}
    sweep = torch.zeros(FLUSH_BYTES // 4)  # (floats,) written before each run: the cores' L2 holds no operand
    for func, specs in calls:
        args = [_operand(s, g) for s in specs]
        func(*args)  # warm-up: oneDNN's primitive for this shape
        best = float("inf")
        for _ in range(repeats):
            sweep.add_(1.0)
            t0 = time.perf_counter()
            func(*args)
            best = min(best, time.perf_counter() - t0)
        f = flops(func, specs)
        total, work = total + best, work + f
        a, b = _mats(func, specs)
        key = f"{func.__name__.split('.')[0]} {'x'.join(map(str, a))} @ {'x'.join(map(str, b))}"
        ms, n, fl = by_shape.get(key, (0.0, 0, 0.0))
        by_shape[key] = (ms + best * 1e3, n + 1, fl + f)
    top = sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:8]
    return {"gemm_ms": round(total * 1e3, 1), "gemm_gflop": round(work / 1e9, 2), "calls": len(calls),
            "by_shape": [{"shape": k, "ms": round(ms, 2), "calls": n, "gflops": round(fl / (ms / 1e3) / 1e9, 1)}
                         for k, (ms, n, fl) in top]}
