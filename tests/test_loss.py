"""The pretraining loss: the fused chunked MLM decoder + cross-entropy against the plain logits path."""
import pytest
import torch
from tiny_project import tiny_batch

from minibert.config import ModelConfig
from minibert.model.bert import build_model, pretrain_loss


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fused_linear_cross_entropy_matches_logits_path(amp):
    """forward(..., labels) gives the loss and gradients of pretrain_loss on the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.0, max_len=13)
    V = 99
    tokens, segments, valid, positions, weights, labels, nsp = tiny_batch([13, 5, 9, 7, 13, 6, 11],
                                                                          [3, 1, 2, 3, 2, 1, 3])
    import minibert.model.loss as ml_
    old_chunk, old_grain, ml_.CHUNK, ml_.GRAIN = ml_.CHUNK, ml_.GRAIN, 4, 2  # several chunks, the last one short
    try:
        grads = []
        for fused in (False, True):
            model = build_model(cfg, V, seed=1)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                if fused:
                    mlm, nsp_l = model(tokens, segments, valid, positions, weights, labels, nsp)
                else:
                    ml, nl = model(tokens, segments, valid, positions, weights)
                    _, mlm, nsp_l = pretrain_loss(ml, labels, weights, nl, nsp)
            (mlm * 1.7 + nsp_l).backward()
            grads.append((mlm.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    finally:
        ml_.CHUNK, ml_.GRAIN = old_chunk, old_grain
    (l0, g0), (l1, g1) = grads
    tol = 1e-5 if amp is None else 2e-2
    torch.testing.assert_close(l0, l1, atol=tol, rtol=tol)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=tol, rtol=tol, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_is_exact_when_the_label_probability_underflows(dtype):
    """A label ~300 nats below the best logit has probability 0 in any float: the loss stays finite and exact."""
    from minibert.model.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    h = torch.randn(7, 13, generator=g)
    weight, bias = torch.randn(37, 13, generator=g) * 0.1, torch.zeros(37)
    labels = torch.randint(0, 37, (7,), generator=g)
    bias[labels[2]] = -300.0  # pair 2's label: p = exp(-300) == 0
    h, weight, bias = (t.to(dtype).requires_grad_() for t in (h, weight, bias))
    fused = linear_cross_entropy(h, weight, bias, labels)
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias).float(), labels)
    assert torch.isfinite(fused) and fused.item() > 300 / 7
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, plain, atol=tol, rtol=tol)
