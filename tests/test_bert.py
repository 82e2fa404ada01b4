"""minibert.model.bert: shapes, same math as a plain padded BERT, padding invariance, loss, persistence."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minibert.config import ModelConfig
from minibert.errors import DataError, MinibertError
from minibert.model.bert import BERT, build_model, check_vocab, load_pretrained, pretrain_loss, save_pretrained
from minibert.model.ops import achieved_drop_prob, dropout

V, H, HEADS, FFN, T, B, P = 99, 12, 3, 37, 13, 7, 5
CFG = ModelConfig(num_layers=2, hidden=H, heads=HEADS, ffn_hidden=FFN, dropout=0.2, max_len=T + 4)


def make_batch(seed: int = 0, b: int = B, t: int = T):
    g = torch.Generator().manual_seed(seed)
    valid = torch.randint(3, t + 1, (b,), generator=g)
    valid[0] = t  # at least one full-length row
    tokens = torch.randint(0, V, (b, t), generator=g)
    segments = torch.randint(0, 2, (b, t), generator=g)
    n_real = torch.randint(1, P + 1, (b,), generator=g)
    weights = (torch.arange(P)[None, :] < n_real[:, None]).float()  # (b, P) real slots first
    positions = torch.stack([torch.randint(0, int(v), (P,), generator=g) for v in valid])  # (b, P)
    positions = torch.where(weights > 0, positions, 0)
    labels = torch.randint(0, V, (b, P), generator=g)
    nsp = torch.randint(0, 2, (b,), generator=g)
    return tokens, segments, valid, positions, weights, labels, nsp


def reference_encode(m: BERT, tokens, segments, valid_lens):
    """The book's padded computation (d2l masked_softmax with -1e6), reusing the model's weights."""
    b, t = tokens.shape
    x = m.token_embedding(tokens) + m.segment_embedding(segments) + m.pos_embedding[:, :t]  # (b, t, H)
    h = m.cfg.heads
    for blk in m.blocks:
        def attend(y):
            q, k, v = blk.qkv(y).view(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)  # 3 x (b, h, t, dh)
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, t, t)
            keep = torch.arange(t)[None, None, None, :] < valid_lens[:, None, None, None]
            s = torch.where(keep, s, torch.tensor(-1e6))
            ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, -1)  # (b, t, H)
            return blk.out(ctx)
        ffn = lambda y: blk.ffn2(torch.relu(blk.ffn1(y)))  # noqa: E731
        if m.cfg.norm == "pre":
            x = x + attend(blk.norm1(x))
            x = x + ffn(blk.norm2(x))
        else:
            x = blk.norm1(attend(x) + x)
            x = blk.norm2(ffn(x) + x)
    return m.final_norm(x)


def test_shapes_batch_and_single_sentence():
    m = build_model(CFG, V, seed=1).eval()
    tokens, segments, valid, positions, weights, *_ = make_batch()
    assert m.encode(tokens, segments, valid).shape == (B, T, H)
    mlm, nsp = m(tokens, segments, valid, positions, weights)
    assert mlm.shape == (int((weights > 0).sum()), V) and nsp.shape == (B, 2)
    one = m.encode(tokens[:1, :6], segments[:1, :6], torch.tensor([6]))
    assert one.shape == (1, 6, H)


def test_book_probe_shapes():
    m = build_model(ModelConfig(), 20256, seed=0).eval()
    for t in (6, 10):
        z = torch.zeros(1, t, dtype=torch.long)
        assert m.encode(z, z, torch.tensor([t])).shape == (1, t, 128)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_unpadded_equals_padded_reference(norm):
    m = build_model(ModelConfig(**{**CFG.__dict__, "norm": norm}), V, seed=2).eval()
    tokens, segments, valid, *_ = make_batch(3)
    with torch.no_grad():
        got, ref = m.encode(tokens, segments, valid), reference_encode(m, tokens, segments, valid)
    for i, n in enumerate(valid.tolist()):
        torch.testing.assert_close(got[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)
        assert torch.all(got[i, n:] == 0)


def test_training_losses_and_gradients_equal_padded_reference():
    """The training path (filler rows, fused loss, index_add_ embedding backward) has the book's gradients."""
    cfg = ModelConfig(**{**CFG.__dict__, "dropout": 0.0})
    tokens, segments, valid, positions, weights, labels, nsp = make_batch(6)
    fast, ref = build_model(cfg, V, seed=5).train(), build_model(cfg, V, seed=5).train()
    mlm, nsp_l = fast(tokens, segments, valid, positions, weights, labels, nsp)
    (mlm + nsp_l).backward()
    x = reference_encode(ref, tokens, segments, valid)  # (B, T, H)
    at = x[torch.arange(B)[:, None], positions]  # (B, P, H)
    _, mlm_r, nsp_r = pretrain_loss(ref.mlm(at)[weights > 0], labels, weights,
                                    ref.nsp(ref.nsp_hidden(x[:, 0])), nsp)
    (mlm_r + nsp_r).backward()
    torch.testing.assert_close(torch.stack([mlm, nsp_l]), torch.stack([mlm_r, nsp_r]), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_invariance():
    m = build_model(CFG, V, seed=3).eval()
    tokens, segments, valid, *_ = make_batch(4)
    longer = torch.randint(0, V, (B, T + 4))  # other pad tokens, more padding
    longer[:, :T] = tokens
    pad_mask = torch.arange(T)[None] >= valid[:, None]
    longer[:, :T][pad_mask] = 0
    seg_longer = torch.ones(B, T + 4, dtype=torch.long)
    seg_longer[:, :T] = segments
    with torch.no_grad():
        a = m.encode(tokens, segments, valid)
        b = m.encode(longer, seg_longer, valid)
    for i, n in enumerate(valid.tolist()):
        torch.testing.assert_close(a[i, :n], b[i, :n], atol=1e-6, rtol=1e-6)


def test_padded_prediction_slots_do_not_change_loss():
    m = build_model(CFG, V, seed=4).eval()
    tokens, segments, valid, positions, weights, labels, nsp = make_batch(5)
    g = torch.Generator().manual_seed(9)
    pad = weights == 0
    positions2 = torch.where(pad, torch.randint(0, T, positions.shape, generator=g), positions)
    labels2 = torch.where(pad, torch.randint(0, V, labels.shape, generator=g), labels)
    with torch.no_grad():
        mlm1, nsp1 = m(tokens, segments, valid, positions, weights)
        mlm2, nsp2 = m(tokens, segments, valid, positions2, weights)
        l1 = pretrain_loss(mlm1, labels, weights, nsp1, nsp)
        l2 = pretrain_loss(mlm2, labels2, weights, nsp2, nsp)
    assert pad.any()
    for x, y in zip(l1, l2):
        assert torch.equal(x, y)
    # ...and the MLM loss is the mean over real slots only (not the book's mean over all slots)
    real = weights > 0
    expected = torch.stack([F.cross_entropy(mlm1[j:j + 1], labels[real][j:j + 1]) for j in range(len(mlm1))]).mean()
    torch.testing.assert_close(l1[1], expected)
    torch.testing.assert_close(l1[0], l1[1] + l1[2])


def test_prediction_at_padding_is_an_error():
    m = build_model(CFG, V, seed=4).eval()
    tokens, segments, valid, positions, weights, *_ = make_batch(5)
    short = int(valid.argmin())
    positions[short, 0], weights[short, 0] = int(valid[short]), 1.0
    with pytest.raises(MinibertError, match="valid length"):
        m(tokens, segments, valid, positions, weights)


def test_loss_falls_with_adam():
    torch.manual_seed(0)
    m = build_model(CFG, V, seed=5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    tokens, segments, valid, positions, weights, labels, nsp = make_batch(6)
    losses = []
    for _ in range(20):
        mlm, nsp_logits = m(tokens, segments, valid, positions, weights)
        total, _, _ = pretrain_loss(mlm, labels, weights, nsp_logits, nsp)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_seed_same_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_model(CFG, V, 7), build_model(CFG, V, 7), build_model(CFG, V, 8)
    assert torch.equal(before, torch.random.get_rng_state())
    for (k, x), y, _z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), k
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters()))


def test_training_is_reproducible_from_the_global_seed():
    m = build_model(CFG, V, seed=9).train()
    batch = make_batch(7)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        outs.append(m(*batch[:5])[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(m(*batch[:5])[0], outs[0])  # dropout really is drawn


def test_save_load_round_trip(tmp_path):
    m = build_model(CFG, V, seed=10).eval()
    save_pretrained(m, tmp_path, {"vocab_sha256": "abc"})
    meta = json.loads((tmp_path / "bert.json").read_text())
    assert meta["vocab_size"] == V and meta["model"]["hidden"] == H and meta["vocab_sha256"] == "abc"
    loaded, meta2 = load_pretrained(tmp_path)
    assert meta2 == meta and not loaded.training
    batch = make_batch(8)
    with torch.no_grad():
        for x, y in zip(m(*batch[:5]), loaded(*batch[:5])):
            assert torch.equal(x, y)


def test_load_missing_or_corrupt_is_one_line_error(tmp_path):
    with pytest.raises(MinibertError, match="bert.json: missing"):
        load_pretrained(tmp_path)
    save_pretrained(build_model(CFG, V, seed=0), tmp_path, {})
    (tmp_path / "bert.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinibertError, match="bert.safetensors") as e:
        load_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_dropout_keep_rate_and_scale():
    p = 0.2
    torch.manual_seed(0)
    n = 2_000_000
    keep = dropout(torch.ones(n), p, training=True) != 0
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(achieved_drop_prob(p) - p) < 1e-4
    assert abs(rate - (1 - achieved_drop_prob(p))) < 5 * sigma
    y = dropout(torch.ones(1000), p, training=True)
    assert set(y.unique().tolist()) <= {0.0, 1 / (1 - p)}
    assert torch.equal(dropout(torch.ones(10), p, training=False), torch.ones(10))


def test_pre_ln_variant_trains():
    """15 real Adam steps on one fixed batch (dropout 0): the pre-LN model must fit it, the loss falling
    every step to under half its start, and every parameter (final LayerNorm included) must move."""
    m = build_model(ModelConfig(**{**CFG.__dict__, "norm": "pre", "dropout": 0.0}), V, seed=11).train()
    start = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    batch = make_batch(9)
    losses = []
    for _ in range(15):
        mlm, nsp = m(*batch)  # the training path: (B, P) labels in, fp32 losses out
        opt.zero_grad()
        (mlm + nsp).backward()
        opt.step()
        losses.append(float((mlm + nsp).detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(p, start[k]) for k, p in m.named_parameters()), "a parameter never moved"


def test_bf16_autocast_step_gives_fp32_losses():
    m = build_model(CFG, V, seed=12)
    tokens, segments, valid, positions, weights, labels, nsp = make_batch(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlm, nsp_logits = m(tokens, segments, valid, positions, weights)
    total, mlm_loss, nsp_loss = pretrain_loss(mlm, labels, weights, nsp_logits, nsp)
    assert mlm.dtype == torch.bfloat16 and total.dtype == mlm_loss.dtype == nsp_loss.dtype == torch.float32
    total.backward()
    assert torch.isfinite(total) and all(p.grad is not None for p in m.parameters())


def test_filler_rows_change_no_loss_or_gradient():
    """Training rounds the row count up with filler rows at pad positions: same losses and grads."""
    from tiny_project import tiny_batch

    import minibert.model.bert as mm
    torch.manual_seed(3)
    cfg = ModelConfig(num_layers=2, hidden=12, heads=3, ffn_hidden=37, dropout=0.0, max_len=13)
    T, V = 13, 99
    tokens, segments, valid, positions, weights, labels, nsp = tiny_batch([13, 5, 9, 7, 12, 6, 11], [3] * 7)
    n_real = int(valid.sum())
    results = []
    for bucket in (1, 16):  # 1: no fillers; 16: rounds 73 real rows up to 80
        old, mm.ROW_BUCKET = mm.ROW_BUCKET, bucket
        try:
            assert mm.token_layout(valid, T).numel() == -(-n_real // bucket) * bucket
            model = build_model(cfg, V, seed=1).train()
            mlm, nsp_l = model(tokens, segments, valid, positions, weights, labels, nsp)
            (mlm + nsp_l).backward()
            enc = model.encode(tokens, segments, valid)
        finally:
            mm.ROW_BUCKET = old
        results.append((mlm.detach(), nsp_l.detach(), enc.detach(),
                        {k: p.grad.clone() for k, p in model.named_parameters()}))
    (a_m, a_n, a_e, a_g), (b_m, b_n, b_e, b_g) = results
    torch.testing.assert_close(a_m, b_m)
    torch.testing.assert_close(a_n, b_n)
    torch.testing.assert_close(a_e, b_e)
    assert (b_e.flatten(0, 1)[(torch.arange(T) >= valid[:, None]).flatten()] == 0).all()  # pads stay zero
    for k in a_g:
        torch.testing.assert_close(a_g[k], b_g[k], atol=1e-6, rtol=1e-5, msg=k)


def test_mlm_head_shapes_repeat_across_batches():
    """The MLM MLP sees slot counts rounded up to SLOT_BUCKET: batches with 13 and 21 slots give one
    shape (oneDNN caches a primitive per matmul shape; a new M every batch grew RSS without bound)."""
    from tiny_project import tiny_batch

    import minibert.model.bert as mm

    torch.manual_seed(4)
    model = build_model(ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, max_len=13), 99, seed=1)
    rows = []
    model.mlm[0].register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    for slots in ([2, 1, 2, 3, 2, 1, 2], [3] * 7):
        model(*tiny_batch([13, 5, 9, 7, 12, 6, 11], slots))
    assert rows == [mm.SLOT_BUCKET, mm.SLOT_BUCKET]


def test_one_vocabulary_check_for_pairs_and_vocab_files():
    sha = "ab" * 32
    check_vocab({"vocab_sha256": sha}, sha, "vocab.txt")
    with pytest.raises(DataError, match="differs from the model's") as e:
        check_vocab({"vocab_sha256": sha}, "cd" * 32, "valid.safetensors")
    assert "valid.safetensors" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="valid.safetensors has no vocab_sha256"):
        check_vocab({"vocab_sha256": sha}, None, "valid.safetensors")
    with pytest.raises(DataError, match="bert.json.* has no vocab_sha256"):  # strict both ways
        check_vocab({}, sha, "vocab.txt")


def test_training_attention_gives_pad_keys_exactly_zero_weight():
    """The dropout path (train mode, p > 0, the hand-written baddbmm one) read back directly: with V
    one-hot per key (dh = T), weights @ V is the dropped-out weight matrix itself. Pad keys must get
    exactly 0; a real key 0 (dropped) or the plain softmax over the real keys alone, times 1/(1 - p)."""
    from minibert.model.bert import attention

    g = torch.Generator().manual_seed(0)
    b, h, t, p = 2, 3, 7, 0.3
    valid = [7, 4]
    q, k = torch.randn(b, h, t, t, generator=g), torch.randn(b, h, t, t, generator=g)  # (b, h, T, dh=T)
    v = torch.eye(t).expand(b, h, t, t)                                                # key j -> e_j
    key_keep = (torch.arange(t) < torch.tensor(valid)[:, None]).view(b, 1, 1, t)
    torch.manual_seed(1)
    w = attention(q, k, v, key_keep, p, training=True)  # (b, h, T, T): query x key weights
    for i, n in enumerate(valid):
        assert (w[i, :, :, n:] == 0).all(), f"pad keys of row {i} got weight"
        ref = torch.softmax(q[i] @ k[i, :, :n].transpose(-1, -2) / math.sqrt(t), dim=-1) / (1 - p)  # (h, T, n)
        got = w[i, :, :, :n]
        kept = got != 0
        assert kept.any() and not kept.all()  # dropout did act
        torch.testing.assert_close(got[kept], ref[kept])


def test_pad_tokens_never_reach_real_rows_in_training():
    """Train mode, dropout > 0, filler rows present (a row bucket of 16 pads 63 real rows to 64 with a
    pad position): changing every pad token changes the filler's keys and values, so the loss and the
    real rows stay identical under the same dropout seed only if pad keys are masked out."""
    from tiny_project import tiny_batch

    import minibert.model.bert as mm

    torch.manual_seed(3)
    tokens, segments, valid, positions, weights, labels, nsp = tiny_batch([13, 5, 9, 7, 12, 6, 11], [3] * 7)
    pad = torch.arange(13) >= valid[:, None]
    other = torch.where(pad, torch.randint(5, 99, tokens.shape), tokens)
    model = build_model(ModelConfig(num_layers=2, hidden=12, heads=3, ffn_hidden=37, dropout=0.3, max_len=13),
                        99, seed=1).train()
    out = []
    old, mm.ROW_BUCKET = mm.ROW_BUCKET, 16
    try:
        assert mm.token_layout(valid, 13).numel() == 64
        for toks in (tokens, other):
            torch.manual_seed(11)
            out.append(torch.stack(model(toks, segments, valid, positions, weights, labels, nsp)).detach())
            torch.manual_seed(12)
            out.append(model.encode(toks, segments, valid).detach())
    finally:
        mm.ROW_BUCKET = old
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


def test_compiled_model_runs_the_kernels_with_the_same_losses():
    """train.compile: torch.compile breaks the graph around the C++ kernels (they cannot be traced)
    and the step computes what the eager model does, dropout bits included."""
    eager = build_model(CFG, V, seed=1).train()
    compiled = torch.compile(build_model(CFG, V, seed=1).train())
    batch = make_batch(2)
    out = []
    for m in (eager, compiled):
        torch.manual_seed(0)
        mlm, nsp = m(*batch)
        (mlm + nsp).backward()
        out.append((torch.stack([mlm, nsp]).detach(), m.get_parameter("blocks.0.qkv.weight").grad))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-4)


def test_cpu_training_attention_is_the_padded_torch_attention():
    """Block.attend on CPU in training runs the fused kernels (kernels/attention.py); the padded torch-op
    path (SDPA: inference, GPUs, the portable path) must give the same rows and gradients. Its dropout
    draws from torch's generator (other bits than the kernel's), so both run with p = 0 (all kept): only
    the roundings differ."""
    from minibert.model.bert import Block, token_layout

    cfg = ModelConfig(num_layers=1, hidden=15, heads=3, ffn_hidden=37, dropout=0.0, max_len=13)
    block = build_model(cfg, 99, 0).blocks[0].train()
    valid = torch.tensor([13, 4, 9, 1, 11, 7, 12])
    B, T = len(valid), 13
    idx = token_layout(valid, T)  # real rows, then fillers at pad positions (bucketed)
    n = int(valid.sum())
    key_keep = (torch.arange(T) < valid[:, None]).view(B, 1, 1, T)
    qkv = torch.randn(len(idx), 3 * 15, generator=torch.Generator().manual_seed(1)).requires_grad_()
    up = torch.randn(n, 15, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    from minibert.model.kernels.attention import attention_rows
    fused = attention_rows(qkv, idx, valid, T, cfg.heads, cfg.dropout)[:n]
    (g_fused,) = torch.autograd.grad(fused, qkv, up)
    torch.manual_seed(7)
    plain = block.attend_padded(qkv, idx, B, T, key_keep)[:n]
    (g_plain,) = torch.autograd.grad(plain, qkv, up)
    assert isinstance(block, Block) and (fused != 0).any()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fused[:n], g_plain[:n], atol=1e-5, rtol=1e-5)


def test_tied_decoder_is_the_scaled_token_embedding_without_bias(tmp_path):
    """model.tie_decoder / decoder_bias: no decoder matrix or bias of its own, logits h @ E.T / sqrt(H),
    the fused training loss equal to the cross-entropy of those logits, and the decoder's gradient
    reaching embedding rows of words absent from the input."""
    cfg = ModelConfig(**{**CFG.__dict__, "tie_decoder": True, "decoder_bias": False, "dropout": 0.0})
    tied, plain = build_model(cfg, V, seed=3), build_model(CFG, V, seed=3)
    assert not any(k.startswith("mlm.3") for k in tied.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(plain) - count(tied) == V * H + V
    tokens, segments, valid, positions, weights, labels, nsp = make_batch(4)
    tokens = tokens % 50  # ids 50..98 never in the input
    tied.eval()
    with torch.no_grad():
        logits, _ = tied(tokens, segments, valid, positions, weights)
        enc = tied.encode(tokens, segments, valid)  # (B, T, H)
        at = enc[torch.arange(B)[:, None].expand_as(positions)[weights > 0], positions[weights > 0]]  # (M, H)
        want = tied.mlm[:-1](at) @ tied.token_embedding.weight.T / math.sqrt(H)  # (M, V)
    assert torch.allclose(logits, want, atol=1e-5)
    tied.train()
    mlm, _ = tied(tokens, segments, valid, positions, weights, labels, nsp)
    assert mlm.item() == pytest.approx(F.cross_entropy(want, labels[weights > 0]).item(), abs=1e-5)
    mlm.backward()
    assert tied.token_embedding.weight.grad[50:].abs().sum() > 0
    save_pretrained(tied, tmp_path, {"vocab_sha256": "abc"})  # one copy of the shared matrix on disk
    loaded, meta = load_pretrained(tmp_path)
    assert meta["model"]["tie_decoder"] is True and loaded.mlm[-1].weight is loaded.token_embedding.weight
    with torch.no_grad():
        assert torch.equal(loaded(tokens, segments, valid, positions, weights)[0], logits)
