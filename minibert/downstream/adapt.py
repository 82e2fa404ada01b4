"""Task-adaptive pretraining (Gururangan et al. 2020, "Don't Stop Pretraining"): a few more MLM + NSP
steps on the task's own training texts before fine-tuning. The texts become the corpus's paragraph
shape (an article a paragraph, sentences ending at a "." word, clitics split as WikiText writes them),
then the pairs stage's own `make_pairs` and the training loop's own `fit`, masks redrawn every step."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
import torch

from minibert.config import FinetuneConfig, PairsConfig, TrainConfig
from minibert.data.batches import to_tensors
from minibert.data.pairs import make_pairs
from minibert.data.text import wikitext_words
from minibert.data.vocab import Vocab, encode_paragraphs
from minibert.errors import DataError
from minibert.model.bert import BERT
from minibert.training import distributed
from minibert.training.loop import fit, make_optimizer

ADAPT_BATCH = 128  # the budget recipe's batch: many small updates pay most on a CPU


def paragraphs(texts: Iterable[str]) -> list[list[list[str]]]:
    """Each text as a paragraph of sentences (a sentence ends at a "." word); texts of fewer than two
    sentences are left out, as the book leaves such WikiText paragraphs out."""
    out = []
    for text in texts:
        sentences, cur = [], []
        for w in wikitext_words(text):
            cur.append(w)
            if w == ".":
                sentences.append(cur)
                cur = []
        if cur:
            sentences.append(cur)
        if len(sentences) >= 2:
            out.append(sentences)
    return out


def adaptation_pairs(texts: Iterable[str], vocab: Vocab, max_len: int, seed: int) -> dict[str, np.ndarray]:
    paras = paragraphs(texts)
    if not paras:
        raise DataError("finetune.adapt_steps: no training text has two sentences to pair; set adapt_steps: 0")
    cfg = PairsConfig(max_len=max_len)
    return make_pairs(encode_paragraphs(paras, vocab), cfg, len(vocab), np.random.default_rng(seed))


def adapt(bert: BERT, texts: Iterable[str], vocab: Vocab, cfg: FinetuneConfig,
          log: Callable[[str], None] = print) -> BERT:
    """`bert` after `cfg.adapt_steps` MLM + NSP steps on `texts` (in place; also returned)."""
    device = next(bert.parameters()).device
    pairs = adaptation_pairs(texts, vocab, bert.cfg.max_len, cfg.split_seed)
    tcfg = dataclasses.replace(TrainConfig(), lr=cfg.adapt_lr, schedule="linear", warmup_share=0.06,
                               optimizer="adamw", beta2=0.98, weight_decay=0.01, grad_clip=0.5,
                               masking="dynamic", mask_rate=0.15, batch_size=min(ADAPT_BATCH, len(pairs["nsp_labels"])),
                               micro_batches=1, max_steps=cfg.adapt_steps, seed=cfg.split_seed, device=str(device),
                               precision="fp32", checkpoint_every=0, eval_every=0, log_every=cfg.adapt_steps)
    with torch.random.fork_rng(devices=[]):
        result = fit(bert, make_optimizer(bert.parameters(), tcfg), tcfg, to_tensors(pairs, device), device,
                     distributed.Dist(), vocab_size=len(vocab))
    last = result.history[-1]
    log(f"finetune: adapted to the task's {len(pairs['nsp_labels'])} training pairs for {cfg.adapt_steps} steps "
        f"(MLM {last['mlm_loss']:.3f}, NSP {last['nsp_loss']:.3f}, {result.train_s:.0f} s)")
    return bert
