"""What a user would otherwise reach for: HF transformers' BertForPreTraining with `Trainer`'s defaults.

Same size as the recipe it stands beside (layers, hidden, heads, FFN, positions), trained on the same
pairs, the same batches (`minibert.data.batches.batch_indices`) and the same static masks (HF's labels: the
original token at each real slot, -100 elsewhere), with what `transformers.Trainer` does when given no
arguments: AdamW lr 5e-5, betas (0.9, 0.999), no weight decay, linear decay to 0 without warmup,
gradient norm clipped to 1.0, BertConfig's dropout 0.1; fp32. Scored with the evaluate stage's
definitions (`score`: MLM cross-entropy and top-1 accuracy over the real masked slots, NSP accuracy).
The ../shared/bench/hf_reference.py script shows the same model on d2l's own pairs.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from minibert.config import ModelConfig
from minibert.data.batches import batch_indices

LR, CLIP = 5e-5, 1.0  # transformers.TrainingArguments defaults (learning_rate, max_grad_norm)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench: the hf recipe needs transformers: pip install -e '.[hf]'") from None
    return transformers


def build(cfg: ModelConfig, vocab_size: int, seed: int):
    tf = _transformers()
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.heads, intermediate_size=cfg.ffn_hidden,
                           max_position_embeddings=cfg.max_len, type_vocab_size=2)
    torch.manual_seed(seed)
    return tf.BertForPreTraining(config)


def inputs(pairs: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """HF's keyword inputs for `rows`, trimmed to their longest pair, plus the MLM labels (-100: no slot)."""
    t = int(pairs["valid_lens"][rows].max())
    tok = torch.from_numpy(np.asarray(pairs["token_ids"][rows, :t], dtype=np.int64))  # (b, t)
    seg = torch.from_numpy(np.asarray(pairs["segments"][rows, :t], dtype=np.int64))
    lens = torch.from_numpy(np.asarray(pairs["valid_lens"][rows], dtype=np.int64))
    labels = torch.full(tok.shape, -100, dtype=torch.long)
    real = np.asarray(pairs["mlm_weights"][rows]) > 0  # (b, P)
    r = np.broadcast_to(np.arange(len(rows))[:, None], real.shape)[real]
    labels[r, np.asarray(pairs["pred_positions"][rows])[real]] = torch.from_numpy(
        np.asarray(pairs["mlm_labels"][rows])[real].astype(np.int64))
    return {"input_ids": tok, "token_type_ids": seg, "attention_mask": (torch.arange(t)[None] < lens[:, None]).long(),
            "labels": labels, "nsp": torch.from_numpy(np.asarray(pairs["nsp_labels"][rows], dtype=np.int64))}


def train(model, pairs: dict[str, np.ndarray], max_steps: int, batch_size: int, seed: int, on_eval=None,
          eval_at: set[int] = frozenset()) -> list[dict]:
    """Trainer-style steps; `on_eval(step)` at the steps in `eval_at` (outside the clock). Rows of
    {step, train_s, **on_eval's figures}."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    n, rows, clock = len(pairs["nsp_labels"]), [], 0.0
    model.train()
    for step in range(max_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = LR * (1 - step / max_steps)  # get_linear_schedule_with_warmup(0 warmup steps)
        b = inputs(pairs, batch_indices(step, n, batch_size, seed))
        out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
        V = out.prediction_logits.shape[-1]
        loss = F.cross_entropy(out.prediction_logits.reshape(-1, V), b["labels"].reshape(-1)) + \
            F.cross_entropy(out.seq_relationship_logits, b["nsp"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        clock += time.perf_counter() - t0
        if not math.isfinite(float(loss.detach())):
            raise SystemExit(f"bench: hf loss is {float(loss.detach())} at step {step + 1}")
        if step + 1 in eval_at and on_eval:
            rows.append({"step": step + 1, "train_s": clock, **on_eval(step + 1)})
    return rows


def score(model, pairs: dict[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """minibert.evaluation.heldout.evaluate's figures for an HF model: sums over real slots / pairs, float64."""
    was = model.training
    model.eval()
    n = len(pairs["nsp_labels"])
    mlm_sum, hits, slots, nsp_hits = 0.0, 0, 0, 0
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            b = inputs(pairs, np.arange(lo, min(lo + batch_size, n)))
            out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                        attention_mask=b["attention_mask"])
            keep = b["labels"] != -100  # (b, t)
            logits, labels = out.prediction_logits[keep].float(), b["labels"][keep]  # (M, V), (M,)
            mlm_sum += float(F.cross_entropy(logits, labels, reduction="sum").double())
            hits += int((logits.argmax(-1) == labels).sum())
            slots += int(labels.numel())
            nsp_hits += int((out.seq_relationship_logits.argmax(-1) == b["nsp"]).sum())
    model.train(was)
    return {"mlm_loss": mlm_sum / slots, "mlm_accuracy": hits / slots, "nsp_accuracy": nsp_hits / n}


def step_seconds(model, pairs: dict[str, np.ndarray], batch_size: int, warmup: int = 2, timed: int = 5) -> float:
    """Mean seconds of a training step after `warmup` untimed ones (the model is trained on: use a copy)."""
    rows = train(model, pairs, warmup + timed, batch_size, seed=0, on_eval=lambda s: {},
                 eval_at={warmup, warmup + timed})
    return (rows[1]["train_s"] - rows[0]["train_s"]) / timed
