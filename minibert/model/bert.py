"""The d2l.ai BERT (encoder, MLM head, NSP head) and its pretraining loss, written for speed.

Same math as the book (d2l 1.0.3 `BERTModel`): token + segment embeddings plus a learned
positional parameter, `num_layers` post-LN Transformer blocks (multi-head attention with biased
W_q/W_k/W_v/W_o, key-padding mask, dropout on the attention weights; AddNorm = LayerNorm(dropout(Y) + X);
FFN Linear-ReLU-Linear), an MLM MLP at the prediction positions and an NSP MLP on <cls>.

What differs is only how the work is laid out, because every FLOP counts on a 2-core CPU:
- unpadding: the batch is flattened to its N real tokens once; embeddings, Linear, LayerNorm, FFN and
  dropout run on (N, H) rows. Rows are scattered to padded (B, T) form only inside attention, where
  pad keys are masked out anyway. Pad positions are therefore never computed (`encode` returns zeros there).
- W_q, W_k, W_v are one Linear(H, 3H): same init distribution (fan_in H), one GEMM instead of three.
- the MLM head sees only the M real prediction slots, never the padded ones.
- on CPU, dropout is one fused pass whose mask is a pure function of (seed, element): the seed is one
  draw from torch's global generator, the drop probability round(p * 2**16) / 2**16 (p=0.2 ->
  0.19999695), kept values scaled by 1/(1 - p) (minibert/model/kernels/dropout.py); and the post-LN AddNorm,
  LayerNorm(dropout(y) + x), is one pass forward and one backward (minibert/model/kernels/addnorm.py); the
  attention's scatter to padded heads, masked softmax + dropout of its weights and gather back to rows
  are one pass each way (minibert/model/kernels/attention.py), the weights' dropout bits the same as above.
- embedding lookups backpropagate with one index_add_ (minibert/model/ops.py); segment and position
  embeddings are summed into one (2T, H) table first.
- the MLM loss averages over real slots only (d2l issue #2582: the book averages the padded ones in too).
Every other device (and CPU tensors with the portable switch, minibert/model/portable.py) runs plain torch ops
instead of the kernels, and trains on a fixed-size layout (`BERT.fixed_losses`) that never waits on the host.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minibert.artifacts import atomic_path, write_json
from minibert.config import ModelConfig
from minibert.errors import DataError, MinibertError
from minibert.model.kernels.addnorm import add_norm
from minibert.model.kernels.attention import attention_rows
from minibert.model.loss import linear_cross_entropy, pretrain_loss  # noqa: F401 (pretrain_loss: public API)
from minibert.model.ops import dropout, gather_rows
from minibert.model.portable import uses_kernels

WEIGHTS_FILE = "bert.safetensors"
META_FILE = "bert.json"


# ---------------------------------------------------------------------------- layout


ROW_BUCKET = 1024  # row counts are rounded up to a multiple of this (see token_layout)
SLOT_BUCKET = 128  # MLM slot counts are rounded up to a multiple of this (see BERT.forward)
IGNORE = -100  # label of an unweighted MLM slot on the portable path (cross_entropy's ignore_index)
OUTSIDE = ("model input: a weighted prediction position lies outside its sequence's valid length; "
           "check pred_positions against valid_lens")


def token_layout(valid_lens: Tensor, T: int, bucket: bool = True) -> Tensor:
    """Flat padded index (b * T + t) of every real token, row-major, then filler rows: (N',).

    The first N rows are the real tokens. N changes every batch, and tensors whose sizes change
    every step fragment the C allocator's heap (RSS grew ~60 MB a step on CPU). So N is rounded up
    to a multiple of ROW_BUCKET with filler rows taken from pad positions: pad keys are masked in
    attention and pad outputs are never read, so fillers change no real row, loss or gradient.
    `bucket=False` (inference) keeps exactly the real rows: no data-dependent branch for torch.export."""
    keep = torch.arange(T, device=valid_lens.device) < valid_lens[:, None]  # (B, T)
    idx = keep.flatten().nonzero().squeeze(1)  # (N,)
    if not bucket:
        return idx
    extra = -idx.numel() % ROW_BUCKET
    if extra and keep.numel() - idx.numel() >= extra:
        fill = (~keep).flatten().nonzero().squeeze(1)[:extra]  # (extra,) pad positions
        idx = torch.cat([idx, fill])
    return idx


def attention(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, p: float, training: bool) -> Tensor:
    """Scaled dot product over (B, h, T, dh) with pad keys masked and dropout on the weights: torch's
    fused SDPA (flash / memory-efficient kernels on CUDA), the book's math. Its dropout draws from torch's
    generator (Philox on CUDA), reseeded every step by `fit`: reproducible per device, other bits than the
    CPU kernel's."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_keep, dropout_p=p if training else 0.0)


# ---------------------------------------------------------------------------- modules


class Block(nn.Module):
    """One Transformer encoder block over unpadded rows (N, H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden
        self.heads, self.p, self.pre = cfg.heads, cfg.dropout, cfg.norm == "pre"
        self.qkv = nn.Linear(H, 3 * H)  # W_q, W_k, W_v stacked
        self.out = nn.Linear(H, H)  # W_o
        self.norm1 = nn.LayerNorm(H)
        self.ffn1 = nn.Linear(H, cfg.ffn_hidden)
        self.ffn2 = nn.Linear(cfg.ffn_hidden, H)
        self.norm2 = nn.LayerNorm(H)

    def attend(self, x: Tensor, idx: Tensor, B: int, T: int, key_keep: Tensor, valid_lens: Tensor) -> Tensor:
        qkv = self.qkv(x)  # (N, 3H)
        if self.training and uses_kernels(x):
            # rows -> heads, masked softmax + dropout, heads -> rows as single passes (kernels/attention.py);
            # with dropout 0 too: the padded torch path costs more than the dropout it skips
            return self.out(attention_rows(qkv, idx, valid_lens, T, self.heads, self.p))
        return self.out(self.attend_padded(qkv, idx, B, T, key_keep))

    def attend_padded(self, qkv: Tensor, idx: Tensor, B: int, T: int, key_keep: Tensor) -> Tensor:
        """The same attention in torch ops on the padded (B, h, T, dh) layout: inference, portable path. (N, H)."""
        H = qkv.shape[1] // 3
        h = self.heads
        padded = qkv.new_zeros(B * T, 3 * H)
        padded.index_copy_(0, idx, qkv)  # (B*T, 3H), zeros at pads
        q, k, v = padded.view(B, T, 3, h, H // h).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, dh)
        ctx = attention(q, k, v, key_keep, self.p, self.training)  # (B, h, T, dh)
        return ctx.transpose(1, 2).reshape(B * T, H).index_select(0, idx)  # (N, H)

    def ffn(self, x: Tensor) -> Tensor:
        return self.ffn2(F.relu(self.ffn1(x)))

    def forward(self, x: Tensor, idx: Tensor, B: int, T: int, key_keep: Tensor, valid_lens: Tensor) -> Tensor:
        p, train = self.p, self.training
        if self.pre:
            x = x + dropout(self.attend(self.norm1(x), idx, B, T, key_keep, valid_lens), p, train)
            return x + dropout(self.ffn(self.norm2(x)), p, train)
        x = self.add_norm(self.attend(x, idx, B, T, key_keep, valid_lens), x, self.norm1)
        return self.add_norm(self.ffn(x), x, self.norm2)

    def add_norm(self, y: Tensor, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        """The book's AddNorm, LayerNorm(dropout(y) + x); one fused pass each way when training on CPU."""
        if self.training and uses_kernels(x):
            return add_norm(y, x, norm.weight, norm.bias, self.p, norm.eps)
        return norm(dropout(y, self.p, self.training) + x)


class TiedDecoder(nn.Module):
    """The MLM decoder reading the token embedding (V, H) as its weight, on inputs scaled by H**-0.5.

    The embedding is referenced, not registered as a submodule: the shared matrix is saved once, as
    `token_embedding.weight`, and `parameters()` lists it once. Embeddings start N(0, 1), so unscaled
    logits of LayerNorm'd inputs would start with std sqrt(H); the scale makes it ~1 (T5's rule)."""

    def __init__(self, embedding: nn.Embedding, bias: bool):
        super().__init__()
        self.__dict__["embedding"] = embedding  # plain attribute: not a submodule, not in state_dict
        V, H = embedding.weight.shape
        self.scale = H ** -0.5
        self.bias = nn.Parameter(torch.zeros(V)) if bias else None

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h * self.scale, self.weight, self.bias)


class BERT(nn.Module):
    """The book's BERTModel: encoder + MLM head + NSP head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        H = cfg.hidden
        self.cfg, self.vocab_size = cfg, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, H)
        self.segment_embedding = nn.Embedding(2, H)
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.max_len, H))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # The pre-LN recipe needs a last LayerNorm: nothing normalises the final residual sum otherwise.
        self.final_norm = nn.LayerNorm(H) if cfg.norm == "pre" else nn.Identity()
        decoder = (TiedDecoder(self.token_embedding, cfg.decoder_bias) if cfg.tie_decoder
                   else nn.Linear(H, vocab_size, bias=cfg.decoder_bias))
        self.mlm = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.LayerNorm(H), decoder)
        self.nsp_hidden = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.nsp = nn.Linear(H, 2)

    def _encode_rows(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Encodings of the real tokens only: rows (N, H) and their flat padded index idx (N,)."""
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise MinibertError(f"model input: sequence length {T} exceeds model.max_len "
                                f"{self.cfg.max_len}; raise model.max_len or shorten the input")
        valid_lens = valid_lens.to(device=tokens.device, dtype=torch.long)
        if self.fixed_layout(tokens):  # every padded position is a row: shapes from (B, T) alone, no host sync
            idx = torch.arange(B * T, device=tokens.device)  # (B*T,)
        else:
            idx = token_layout(valid_lens, T, bucket=self.training)  # (N,) real rows first
        # segment and position embeddings as one (2T, H) table: row s * T + t = segment s + position t
        seg_pos = (self.segment_embedding.weight[:, None] + self.pos_embedding[:, :T]).reshape(2 * T, -1)
        x = (gather_rows(self.token_embedding.weight, tokens.flatten()[idx].long())
             + gather_rows(seg_pos, segments.flatten()[idx].long() * T + idx % T))  # (N, H)
        key_keep = (torch.arange(T, device=tokens.device) < valid_lens[:, None]).view(B, 1, 1, T)
        for block in self.blocks:
            x = block(x, idx, B, T, key_keep, valid_lens)
        return self.final_norm(x), idx

    def fixed_layout(self, tokens: Tensor) -> bool:
        """Training on the portable path (GPUs; minibert.model.portable): pads kept as rows, all MLM slots scored."""
        return self.training and not uses_kernels(tokens)

    def encode(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        """(B, T) tokens/segments, (B,) valid_lens -> (B, T, H); rows past valid_len are zeros."""
        B, T = tokens.shape
        rows, idx = self._encode_rows(tokens, segments, valid_lens)
        if self.fixed_layout(tokens):
            keep = torch.arange(T, device=rows.device) < valid_lens.to(rows.device)[:, None]  # (B, T)
            return torch.where(keep[..., None], rows.view(B, T, -1), 0.0)  # (B, T, H)
        if self.training:  # drop the filler rows (real rows come first); eval makes none
            n = int(valid_lens.sum())
            rows, idx = rows[:n], idx[:n]
        out = rows.new_zeros(B * T, rows.shape[1])
        out[idx] = rows
        return out.view(B, T, -1)  # (B, T, H)

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor, pred_positions: Tensor,
                mlm_weights: Tensor, mlm_labels: Tensor | None = None,
                nsp_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> mlm_logits (M, V) for the slots with weight > 0 (row-major), nsp_logits (B, 2).

        Given `mlm_labels` (B, P) and `nsp_labels` (B,), returns the fp32 losses (mlm, nsp) instead —
        the same values as `pretrain_loss` on the logits, but the (M, V) logits are never materialised
        whole (see `linear_cross_entropy`). Training goes through here so DDP's forward hooks run."""
        B, T = tokens.shape
        rows, idx = self._encode_rows(tokens, segments, valid_lens)
        if mlm_labels is not None and self.fixed_layout(tokens):
            return self.fixed_losses(rows, B, T, valid_lens, pred_positions, mlm_weights, mlm_labels, nsp_labels)
        row_of = torch.full((B * T,), -1, dtype=torch.long, device=rows.device)
        row_of[idx] = torch.arange(idx.numel(), device=rows.device)  # padded flat index -> row
        real = mlm_weights > 0  # (B, P)
        slots = (pred_positions.long().clamp(0, T - 1)
                 + torch.arange(B, device=rows.device)[:, None] * T)[real]  # (M,)
        mlm_rows = row_of[slots]  # (M,)
        outside = real & (pred_positions.long() >= valid_lens.to(pred_positions.device).long()[:, None])
        if bool(outside.any()):
            raise MinibertError(OUTSIDE)
        cls_rows = row_of[torch.arange(B, device=rows.device) * T]  # (B,) position 0 of each pair
        nsp_logits = self.nsp(self.nsp_hidden(rows.index_select(0, cls_rows)))  # (B, 2)
        if mlm_labels is None:
            return self.mlm(rows.index_select(0, mlm_rows)), nsp_logits  # (M, V), (B, 2)
        # M changes every batch, and oneDNN caches a primitive (with its buffers) per matmul shape: the
        # MLM MLP runs on M rounded up to SLOT_BUCKET (filler rows repeat row 0 and are cut off again),
        # which stopped RSS growing ~5 MB a step for the whole run.
        M = mlm_rows.numel()
        hidden = self.mlm[:-1](rows.index_select(0, F.pad(mlm_rows, (0, -M % SLOT_BUCKET))))[:M]  # (M, H)
        decoder = self.mlm[-1]
        if isinstance(decoder, TiedDecoder):
            hidden = hidden * decoder.scale
        bias = decoder.bias if decoder.bias is not None else decoder.weight.new_zeros(self.vocab_size)
        mlm = linear_cross_entropy(hidden, decoder.weight, bias, mlm_labels[real].long())
        return mlm, F.cross_entropy(nsp_logits.float(), nsp_labels.long())

    def fixed_losses(self, rows: Tensor, B: int, T: int, valid_lens: Tensor, pred_positions: Tensor,
                     mlm_weights: Tensor, mlm_labels: Tensor, nsp_labels: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s losses on the portable path: rows (B*T, H) in padded order, all B*P slots scored and
        the unweighted ones ignored, so every shape comes from (B, T, P) and no step waits on the host.
        Same math: the MLM mean is over the real slots; the check below is asynchronous on CUDA."""
        real = mlm_weights > 0  # (B, P)
        pos = pred_positions.long()
        torch._assert_async(~(real & (pos >= valid_lens.to(pos.device).long()[:, None])).any(), OUTSIDE)
        slots = (pos.clamp(0, T - 1) + torch.arange(B, device=rows.device)[:, None] * T).flatten()  # (B*P,)
        logits = self.mlm(rows.index_select(0, slots))  # (B*P, V)
        labels = torch.where(real, mlm_labels.long(), IGNORE).flatten()  # (B*P,)
        nsp_logits = self.nsp(self.nsp_hidden(rows.view(B, T, -1)[:, 0]))  # (B, 2) <cls> rows
        return (F.cross_entropy(logits.float(), labels, ignore_index=IGNORE),
                F.cross_entropy(nsp_logits.float(), nsp_labels.long()))


class Encoder(nn.Module):
    """The encoder alone, `forward(tokens, segments, valid_lens) -> (B, T, H)`: what
    `mlflow.pytorch.log_model` exports (torch.export graph) for `mlflow.pytorch.load_model`."""

    def __init__(self, bert: BERT):
        super().__init__()
        self.bert = bert

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        return self.bert.encode(tokens, segments, valid_lens)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> BERT:
    """A freshly initialised BERT; the init depends only on `seed`, the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BERT(cfg, vocab_size)


# ---------------------------------------------------------------------------- persistence


def _unwrap(model: nn.Module) -> BERT:
    while not isinstance(model, BERT):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)  # DDP / torch.compile
        if inner is None:
            raise MinibertError(f"save_pretrained: expected a BERT (or a DDP/compiled wrapper), got "
                                f"{type(model).__name__}")
        model = inner
    return model


def save_pretrained(model: nn.Module, out_dir: Path, meta: dict) -> None:
    """out_dir/bert.safetensors (weights) + out_dir/bert.json (config, vocab size, meta), atomically."""
    bert = _unwrap(model)
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in bert.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE, need=sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / META_FILE, {"model": asdict(bert.cfg), "vocab_size": bert.vocab_size, **meta})


def load_pretrained(model_dir: Path, device: str | torch.device = "cpu") -> tuple[BERT, dict]:
    """The model saved by `save_pretrained` (in eval mode) and its bert.json dict."""
    model_dir = Path(model_dir)
    meta_path, weights_path = model_dir / META_FILE, model_dir / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise MinibertError(f"{path}: missing; run the pretrain stage (dvc repro pretrain) first")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = ModelConfig(**meta["model"])
        vocab_size = int(meta["vocab_size"])
    except Exception as e:  # noqa: BLE001 - any malformed metadata is the same user error
        raise MinibertError(f"{meta_path}: unreadable model metadata ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else e!r}); re-run the pretrain stage") from None
    model = BERT(cfg, vocab_size)
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or mismatched file is the same user error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinibertError(f"{weights_path}: corrupt or does not match {META_FILE} ({first}); "
                            f"re-run the pretrain stage") from None
    return model.to(device).eval(), meta


def check_vocab(meta: dict, vocab_sha: str | None, source: str | Path) -> None:
    """Fail unless `source` (a vocab.txt, or pairs encoded with one) holds the vocabulary the model with
    bert.json `meta` was trained on: the one check of the evaluate and probe stages and `minibert encode`."""
    want = meta.get("vocab_sha256")
    if not want or not vocab_sha:
        which = f"model metadata ({META_FILE})" if not want else f"{source}"
        raise DataError(f"{which} has no vocab_sha256; re-run `dvc repro` (tokenize onwards)")
    if want != vocab_sha:
        raise DataError(f"{source}: vocabulary {vocab_sha[:12]}… differs from the model's {want[:12]}…; "
                        "re-run `dvc repro` so data and model come from one tokenize run")
