"""Word-similarity probes: does the model place words that people judge similar close together?

Two kinds of word vector are scored, each by the Spearman correlation between the cosine similarity of
a pair's vectors and the human judgement (SimLex-999: similarity; WordSim-353: relatedness):
- `embedding`: the input token embedding of the word;
- `context`: the encoder's output at the word when it is encoded alone, `<cls> word <sep>`.
Only pairs whose two words are in the vocabulary count (the count is reported). The same figures for
the untrained model (the initialisation the pretrain stage starts from) are the control.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from minibert.data.vocab import CLS, SEP, SPECIALS, Vocab
from minibert.errors import DataError


def read_judgements(path: Path) -> pd.DataFrame:
    """`word1<TAB>word2<TAB>score` lines, `#` comments (gensim's SimLex-999 and WordSim-353 files)."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            rows.append((parts[0].strip().lower(), parts[1].strip().lower(), float(parts[2])))
        except (IndexError, ValueError):
            raise DataError(f"{path}:{i}: expected 'word1<TAB>word2<TAB>score'; got {line[:40]!r}") from None
    if not rows:
        raise DataError(f"{path}: no word pairs; use the pinned file (minibert/data/pinned.py)")
    return pd.DataFrame(rows, columns=["word1", "word2", "human"])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks, ties given their average rank."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def word_vectors(model: torch.nn.Module, vocab: Vocab, words: list[str]) -> dict[str, np.ndarray]:
    """{'embedding': (n, H), 'context': (n, H)} for `words` (all in the vocabulary), in eval mode."""
    ids = torch.tensor([vocab.id(w) for w in words], dtype=torch.long)  # (n,)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.inference_mode():
        emb = model.token_embedding.weight[ids.to(device)].float().cpu().numpy()  # (n, H)
        tokens = torch.stack([torch.full_like(ids, CLS), ids, torch.full_like(ids, SEP)], 1)  # (n, 3)
        ctx = model.encode(tokens.to(device), torch.zeros_like(tokens).to(device),
                           torch.full((len(words),), 3, device=device))[:, 1]  # (n, H) the word's position
    model.train(was)
    return {"embedding": emb.astype(np.float64), "context": ctx.float().cpu().numpy().astype(np.float64)}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (n, H) and (n, H) -> (n,)."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def score(model: torch.nn.Module, vocab: Vocab, pairs: pd.DataFrame) -> dict[str, float]:
    """{'pairs': in-vocabulary pairs, 'total': all pairs, 'spearman_embedding', 'spearman_context'}."""
    words_known = set(vocab.tokens[len(SPECIALS):])
    known = pairs[pairs["word1"].isin(words_known) & pairs["word2"].isin(words_known)]
    out = {"pairs": len(known), "total": len(pairs)}
    if len(known) < 3:  # a rank correlation of fewer pairs says nothing
        return out
    words = sorted(set(known["word1"]) | set(known["word2"]))
    index = {w: i for i, w in enumerate(words)}
    vecs = word_vectors(model, vocab, words)
    i1, i2 = known["word1"].map(index).to_numpy(), known["word2"].map(index).to_numpy()
    for kind, v in vecs.items():
        out[f"spearman_{kind}"] = spearman(_cos(v[i1], v[i2]), known["human"].to_numpy())
    return out


def word_similarity(model: torch.nn.Module, untrained: torch.nn.Module, vocab: Vocab, names: tuple[str, ...],
                    env: dict[str, str] | None = None) -> dict[str, dict]:
    """{dataset: {'trained': score, 'untrained': score}} for each of `names` (keys of pinned.SOURCES)."""
    from minibert.data.pinned import locate

    out = {}
    for name in names:
        pairs = read_judgements(locate(name, env))
        out[name] = {"trained": score(model, vocab, pairs), "untrained": score(untrained, vocab, pairs)}
    return out
