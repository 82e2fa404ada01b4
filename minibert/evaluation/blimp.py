"""BLiMP, zero-shot: does the pretrained model prefer the acceptable sentence of a minimal pair?

Each sentence is scored by pseudo-log-likelihood (Salazar et al., ACL 2020): every word masked in turn,
the log-probabilities of the true words summed. A pair counts as right only when the acceptable
sentence scores strictly higher (a tie is wrong), and only pairs whose words are all in the vocabulary
count (the count is reported). Two controls take the same pairs and the same rule: the untrained model
(the initialisation pretraining starts from) and a unigram model of the training words (each word's
log relative frequency summed), which separates pairs by word choice alone and ties on every pair that
only reorders words.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import torch

from minibert.data.corpus import unsafe_reason
from minibert.data.text import wikitext_words
from minibert.data.vocab import CLS, MASK, SEP, UNK, Vocab
from minibert.errors import DataError

COLUMNS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID")


def read_blimp(path, origin: str | None = None) -> pd.DataFrame:
    """good, bad, field, linguistics_term, UID: every pair of the archive's `data/<UID>.jsonl` members,
    read in memory after the download stage's safety checks (macOS metadata members are skipped)."""
    origin = origin or str(path)
    fix = "replace it with the pinned blimp.zip (docs/transfer.md)"
    rows = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if reason := unsafe_reason(info):
                    raise DataError(f"{origin}: member {info.filename!r} is {reason}; {fix}")
                p = PurePosixPath(info.filename)
                if info.is_dir() or p.suffix != ".jsonl" or "__MACOSX" in p.parts or p.name.startswith("."):
                    continue
                for n, line in enumerate(zf.read(info).decode("utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                        rows.append(tuple(str(r[k]) for k in COLUMNS))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(f"{origin}: {info.filename}:{n}: not a BLiMP row ({type(e).__name__}: "
                                        f"{e}); {fix}") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{origin}: not a valid zip archive ({e}); {fix}") from None
    if not rows:
        raise DataError(f"{origin}: holds no data/*.jsonl pairs; {fix}")
    return pd.DataFrame(rows, columns=["good", "bad", "field", "linguistics_term", "UID"])


def encode_pairs(df: pd.DataFrame, vocab: Vocab, max_len: int) -> tuple[pd.DataFrame, list[list[int]], list[list[int]]]:
    """(the pairs kept, their good and bad word ids): pairs with a word outside the vocabulary, or a
    sentence too long for `<cls> … <sep>` in `max_len`, are dropped."""
    keep, good, bad = [], [], []
    for i, (g, b) in enumerate(zip(df["good"], df["bad"])):
        ig, ib = vocab.encode(wikitext_words(g)), vocab.encode(wikitext_words(b))
        if UNK in ig or UNK in ib or not ig or not ib or max(len(ig), len(ib)) + 2 > max_len:
            continue
        keep.append(i)
        good.append(ig)
        bad.append(ib)
    return df.iloc[keep].reset_index(drop=True), good, bad


def pseudo_log_likelihood(model: torch.nn.Module, sentences: list[list[int]], batch_size: int = 512) -> np.ndarray:
    """(S,) float64: for each sentence (word ids), the sum over its words of log p(word | the sentence with
    that word masked), the model reading `<cls> w1 … wn <sep>` in segment 0."""
    device = next(model.parameters()).device
    rows = [(s, i) for s, ids in enumerate(sentences) for i in range(len(ids))]  # one masked copy per word
    rows.sort(key=lambda r: len(sentences[r[0]]))  # batches of like lengths: little padding
    out = np.zeros(len(sentences), np.float64)
    was = model.training
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            T = max(len(sentences[s]) for s, _ in chunk) + 2
            tokens = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T) <pad> = 0
            valid = torch.tensor([len(sentences[s]) + 2 for s, _ in chunk])  # (B,)
            truth = torch.tensor([sentences[s][i] for s, i in chunk])  # (B,)
            for r, (s, i) in enumerate(chunk):
                ids = [CLS, *sentences[s], SEP]
                ids[i + 1] = MASK
                tokens[r, :len(ids)] = torch.tensor(ids)
            positions = torch.tensor([i + 1 for _, i in chunk])[:, None]  # (B, 1)
            logits, _ = model(tokens.to(device), torch.zeros_like(tokens).to(device), valid.to(device),
                              positions.to(device), torch.ones(len(chunk), 1, device=device))  # (B, V)
            logp = torch.log_softmax(logits.float(), -1).gather(1, truth.to(device)[:, None])[:, 0].double().cpu()
            np.add.at(out, [s for s, _ in chunk], logp.numpy())
    model.train(was)
    return out


def word_counts(tokens_path, vocab: Vocab) -> np.ndarray:
    """(V,) how often each word occurs in the training split the tokenize stage wrote (its vocabulary
    must be `vocab`: one error line otherwise)."""
    from safetensors import safe_open

    with safe_open(str(tokens_path), framework="numpy") as f:
        sha = (f.metadata() or {}).get("vocab_sha256")
        ids = f.get_tensor("ids")
    if sha != vocab.sha256:
        raise DataError(f"{tokens_path}: made with another vocabulary than {vocab.sha256[:12]}…; rerun the "
                        "tokenize stage (dvc repro)")
    return np.bincount(ids.astype(np.int64), minlength=len(vocab))


def unigram_scores(sentences: list[list[int]], counts: np.ndarray) -> np.ndarray:
    """(S,): the sum of log(count(w) / total) over each sentence's words (`counts`: (V,) training counts)."""
    logp = np.log(np.maximum(counts, 1e-300) / counts.sum())
    return np.array([logp[ids].sum() for ids in sentences], np.float64)


def right(good: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Per pair: the acceptable sentence scored strictly higher (a tie is wrong)."""
    return good > bad


def table(pairs: pd.DataFrame, total: pd.DataFrame, correct: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per paradigm: UID, field, linguistics_term, pairs (scored), total (in BLiMP), accuracy_<system>."""
    scored = pairs.assign(**{f"accuracy_{k}": v.astype(float) for k, v in correct.items()})
    agg = scored.groupby(["UID", "field", "linguistics_term"], sort=True)
    out = agg.agg(pairs=("good", "size"), **{c: (c, "mean") for c in scored.columns if c.startswith("accuracy_")})
    sizes = total.groupby("UID").size().rename("total")
    return out.reset_index().join(sizes, on="UID")[["UID", "field", "linguistics_term", "pairs", "total",
                                                      *[f"accuracy_{k}" for k in correct]]]


def summary(pairs: pd.DataFrame, total: int, correct: dict[str, np.ndarray]) -> dict:
    """metrics/blimp.json: pairs scored of all, then per system the accuracy over the scored pairs,
    per `field` and per `linguistics_term`."""
    out = {"pairs": int(len(pairs)), "total_pairs": int(total), "paradigms": int(pairs["UID"].nunique())}
    for system, ok in correct.items():
        s = pd.Series(ok.astype(float), index=pairs.index)
        out[system] = {"accuracy": float(s.mean()) if len(s) else float("nan"),
                       "field": {k: float(v) for k, v in s.groupby(pairs["field"]).mean().items()},
                       "linguistics_term": {k: float(v) for k, v in s.groupby(pairs["linguistics_term"]).mean().items()}}
    return out


def score(models: dict[str, torch.nn.Module], counts: np.ndarray, df: pd.DataFrame, vocab: Vocab,
          max_len: int, batch_size: int = 512) -> tuple[dict, pd.DataFrame]:
    """(metrics, per-paradigm table) for each of `models` by pseudo-log-likelihood and the unigram
    control from `counts`, on the pairs of `df` whose words are all in the vocabulary."""
    pairs, good, bad = encode_pairs(df, vocab, max_len)
    correct = {name: right(pseudo_log_likelihood(m, good, batch_size), pseudo_log_likelihood(m, bad, batch_size))
               for name, m in models.items()}
    correct["unigram"] = right(unigram_scores(good, counts), unigram_scores(bad, counts))
    return summary(pairs, len(df), correct), table(pairs, df, correct)


def flat_metrics(m: dict) -> dict[str, float]:
    """MLflow scalars: blimp_accuracy.<system>, blimp_accuracy.<system>.<field>, blimp_pairs."""
    out = {"blimp_pairs": float(m["pairs"])}
    for system in ("pretrained", "untrained", "unigram"):
        out[f"blimp_accuracy.{system}"] = m[system]["accuracy"]
        out |= {f"blimp_accuracy.{system}.{f}": v for f, v in m[system]["field"].items()}
    return out
