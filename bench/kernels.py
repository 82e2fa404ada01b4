"""What each C++ kernel family (minibert/kernels) and the K = 128 decoder save per default training
step, against the code each replaced, timed in one process at the step's real shapes.

    python -m bench.kernels [--rounds 30] [--micro-batches K]

The 2-core machines are shared: whole-step timings of two code versions swing by +-10 % between
runs, more than any one lever (`bench.train` is the whole-step figure). Here both sides of each lever run alternately in the same process,
`--rounds` times, and each keeps its minimum (the run least disturbed by other load). A row is
one call's forward + backward (dropout, AddNorm) or the in-place pass (softmax_xent), then that
times the calls a default step makes: bf16, 2 layers, K micro-batches (default: train.micro_batches),
a WikiText-2 batch of 512 pairs holding ~23.6k real tokens and ~3.5k MLM slots, 512-row loss chunks:

- dropout on the attention weights (bf16 (512/K, 2, 64, 64)): 2K a step, against the bit-mask
  dropout minibert used before (16 bits of a 64-bit draw, a scale tensor);
- AddNorm, LayerNorm(x + dropout(y)) with y bf16 (a Linear's output) and x fp32, on (23.6k/K, 128):
  4K a step, against autocast's eager `norm(dropout(y) + x)` with the same bit-mask dropout;
- the vocabulary softmax of the MLM loss, bias added, on (512, 20256) bf16 logits: 7 a step, against
  eager softmax, gather, log, scatter, fill and a bias column sum (the code before the kernel, with
  the bias added by broadcast as the K = 128 GEMM then needs);
- the attention of one block around its GEMMs (bf16 qkv (23.6k/K, 384) -> context rows (23.6k/K, 128),
  forward + backward): 2K a step, the C++ layout and softmax-dropout passes (kernels/attention.py)
  against the eager chain they replaced (zero fill + index_copy to padded rows, permute copies, a
  -inf bias tensor in baddbmm, softmax, the dropout kernel, transpose copy + index_select);
- the MLM decoder of one micro-batch (3.5k/K slots in 512-row chunks; its three GEMMs, the softmax
  pass, the fp32 dW accumulation): K a step, with the bias added inside the softmax pass (GEMMs with
  K = hidden = 128, minibert.model.loss) against the bias as a ones column of the GEMMs (K = 129, dL/db
  from the weight-gradient GEMM: minibert before this lever). Both use the C++ softmax pass.
Prints one JSON line per family and a table.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from minibert.config import ModelConfig
from minibert.model.bert import Block, token_layout
from minibert.model.kernels import build
from minibert.model.kernels.addnorm import add_norm
from minibert.model.kernels.attention import attention_rows
from minibert.model.kernels.dropout import dropout
from minibert.model.kernels.softmax_xent import softmax_xent_
from minibert.model.loss import linear_cross_entropy
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import resolve_micro_batches

P, H, V, CHUNK = 0.2, 128, 20256, 512
CUT = round(P * 65536) - 32768  # the old bit-mask: int16 bits >= CUT keep (drop probability round(p 2^16)/2^16)


def bitmask_dropout(x: torch.Tensor) -> torch.Tensor:
    """minibert's dropout before the kernels: one 64-bit draw feeds four elements' 16 bits."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    keep = words.view(torch.int16)[:n].view(x.shape) >= CUT
    return x * keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - P))


def eager_softmax_xent(z: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor, grad_b: torch.Tensor) -> None:
    """The loss chunk before the kernel (softmax in the matmul dtype, log p[label] from it), plus the
    broadcast bias add and column sum that a bias-less (K = 128) GEMM needs in plain torch."""
    rows = torch.arange(len(z))
    g = torch.softmax(z + bias.to(z.dtype), dim=-1)  # (c, V)
    g[rows, labels].float().log()
    g[rows, labels] -= 1.0
    grad_b += g.sum(0, dtype=torch.float32)


def decoder(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, ones_column: bool):
    """dL/dh, dL/dW, dL/db of one micro-batch's summed MLM loss: minibert's `linear_cross_entropy` (K = 128,
    the bias added in the softmax pass), or the ones-column decoder it replaced (K = 129)."""
    if not ones_column:
        leaves = [t.detach().requires_grad_() for t in (h, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(*leaves, labels)  # the forward forms the gradients
        (loss * len(h)).backward()  # the backward only scales them
        return tuple(t.grad for t in leaves)
    dt = torch.bfloat16  # [h, 1] @ [W, b].T: the bias rides in the GEMMs, dL/db in dW's last column
    hp, w = F.pad(h.to(dt), (0, 1), value=1.0), torch.cat([weight, bias[:, None]], 1).to(dt)
    grad_h, grad_w = torch.empty(len(h), H, dtype=dt), None
    for s in range(0, len(h), CHUNK):
        hc = hp[s:s + CHUNK]
        g = hc @ w.t()  # (c, V)
        softmax_xent_(g, labels[s:s + CHUNK], len(hc))
        grad_h[s:s + CHUNK] = (g @ w)[:, :H]  # (c, H)
        part = (g.t() @ hc).float()  # (V, H + 1)
        grad_w = part if grad_w is None else grad_w.add_(part)
    return grad_h, grad_w[:, :H], grad_w[:, H]


TOKENS, SLOTS = 23_600, 3_540  # real tokens and MLM slots of a WikiText-2 batch of 512 pairs (bench.train)


def families(k: int) -> dict[str, tuple[int, callable, callable]]:
    """name -> (calls per default step, the lever's call, the call it replaced) at k micro-batches."""
    g = torch.Generator().manual_seed(0)
    rows, slots = TOKENS // k, -(-SLOTS // k // 128) * 128  # slots padded to 128-row grains, as the loss does
    att = torch.randn(512 // k, 2, 64, 64, generator=g).softmax(-1).to(torch.bfloat16).requires_grad_()
    d_att = torch.randn(att.shape, generator=g).to(torch.bfloat16)
    y = torch.randn(rows, H, generator=g).to(torch.bfloat16).requires_grad_()  # (N, H) a Linear's output
    x = torch.randn(rows, H, generator=g).requires_grad_()  # (N, H) the residual, fp32
    norm = torch.nn.LayerNorm(H)
    d_out = torch.randn(rows, H, generator=g)
    logits = torch.randn(CHUNK, V, generator=g).mul(3).to(torch.bfloat16)  # (c, V)
    labels = torch.randint(0, V, (CHUNK,), generator=g)
    bias, grad_b = torch.randn(V, generator=g), torch.zeros(V)
    h = F.layer_norm(torch.randn(slots, H, generator=g), (H,))  # (M, H) one micro-batch's MLM slots
    weight, slot_labels = torch.randn(V, H, generator=g) * 0.05, torch.randint(0, V, (slots,), generator=g)

    B = 512 // k  # pairs of one micro-batch, lengths as bench.step's WikiText-2-shaped batches
    valid = (torch.randn(B, generator=g) * 14 + 40).round().clamp(8, 64).long()
    idx = token_layout(valid, 64)  # (N',) real rows, then fillers
    qkv = torch.randn(len(idx), 3 * H, generator=g).to(torch.bfloat16).requires_grad_()
    d_ctx = torch.randn(len(idx), H, generator=g).to(torch.bfloat16)
    key_keep = (torch.arange(64) < valid[:, None]).view(B, 1, 1, 64)

    def backward(out, grad):
        out.backward(grad)
        for t in (att, y, x, norm.weight, norm.bias, qkv):
            t.grad = None

    block = Block(ModelConfig(hidden=H, heads=2, dropout=P)).train()  # its torch-op path: the code before

    def eager_attention():
        backward(block.attend_padded(qkv, idx, B, 64, key_keep), d_ctx)

    def eager_addnorm():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(bitmask_dropout(y) + x)
        backward(out, d_out)

    return {
        "dropout (attention weights)": (2 * k, lambda: backward(dropout(att, P), d_att),
                                        lambda: backward(bitmask_dropout(att), d_att)),
        "AddNorm (post-LN)": (4 * k, lambda: backward(add_norm(y, x, norm.weight, norm.bias, P), d_out), eager_addnorm),
        "softmax_xent (MLM loss chunk)": (-(-SLOTS // CHUNK), lambda: softmax_xent_(logits.clone(), labels, CHUNK, bias, grad_b),
                                          lambda: eager_softmax_xent(logits.clone(), labels, bias, grad_b)),
        "attention around its GEMMs (one block)": (2 * k, lambda: backward(attention_rows(qkv, idx, valid, 64, 2, P),
                                                                           d_ctx), eager_attention),
        "MLM decoder, bias in the pass (K=128)": (k, lambda: decoder(h, weight, bias, slot_labels, False),
                                                  lambda: decoder(h, weight, bias, slot_labels, True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="alternate new/before this often; keep each one's min")
    ap.add_argument("--micro-batches", type=int,  # train.micro_batches: auto for bf16 on CPU (1)
                    default=resolve_micro_batches("auto", torch.device("cpu"), torch.bfloat16))
    a = ap.parse_args()
    if not build.load():
        raise SystemExit("bench.kernels: the C++ kernels are not built (make install; needs g++)")
    tune_cpu_malloc()
    rows = []
    for name, (calls, new, before) in families(a.micro_batches).items():
        best = {"new": math.inf, "before": math.inf}
        new(), before()  # warm-up: first-touch pages, oneDNN/ATen caches
        for _ in range(a.rounds):
            for side, fn in (("new", new), ("before", before)):
                t0 = time.perf_counter()
                fn()
                best[side] = min(best[side], (time.perf_counter() - t0) * 1e3)
        row = {"bench": "kernels", "family": name, "calls_per_step": calls, "new_ms": round(best["new"], 3),
               "before_ms": round(best["before"], 3), "speedup": round(best["before"] / best["new"], 2),
               "saved_ms_per_step": round(calls * (best["before"] - best["new"]), 1),
               "micro_batches": a.micro_batches, "threads": torch.get_num_threads()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'lever':38s} {'calls':>5s} {'new ms':>9s} {'before ms':>9s} {'x':>5s} {'saved ms/step':>13s}")
    for r in rows:
        print(f"{r['family']:38s} {r['calls_per_step']:5d} {r['new_ms']:9.3f} {r['before_ms']:9.3f} "
              f"{r['speedup']:5.2f} {r['saved_ms_per_step']:13.1f}")
    print(f"{'total':38s} {'':5s} {'':9s} {'':9s} {'':5s} {sum(r['saved_ms_per_step'] for r in rows):13.1f}")


if __name__ == "__main__":
    main()
