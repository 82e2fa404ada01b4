"""Probes: the pretrained encoder applied to a few sentences, as in the book's closing section.

Each probe is `<cls> a <sep>` or `<cls> a <sep> b <sep>` (lower-cased, whitespace-split like the
book), encoded as ONE unpadded example in eval mode. We report the encoding's shape, the `<cls>`
vector, the vector of the probe's named word, and, for every two probes naming the same word, the
cosine similarity of that word across the two contexts (the book's `crane` example).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from minibert.config import ProbeConfig, ProbeSpec
from minibert.data.vocab import CLS, SEP, Vocab, pair_layout
from minibert.errors import DataError, MinibertError

N_VALUES = 4  # leading vector components shown per token in the table (v0..v3)


class UnknownWordWarning(UserWarning):
    """A probe word is not in the vocabulary and is fed to the model as `<unk>`."""


def probe_words(spec: ProbeSpec) -> tuple[list[str], list[int]]:
    """Input words with `<cls>`/`<sep>` and their segment ids, the book's `get_tokens_and_segments`."""
    b = spec.b.lower().split() if spec.b else None
    return pair_layout(spec.a.lower().split(), b, "<cls>", "<sep>")


def encode_probe(model: torch.nn.Module, vocab: Vocab, spec: ProbeSpec,
                 device: str | torch.device | None = None) -> tuple[list[str], list[int], torch.Tensor]:
    """-> (tokens as fed to the model, segments, encoding (1, T, H) on the CPU); unknown words warn and
    become `<unk>`. The inputs are built on `device`, by default the model's."""
    if device is None:
        device = next(model.parameters()).device
    if len(vocab) != model.vocab_size:  # ids would index past the embedding table
        raise DataError(f"vocabulary has {len(vocab)} entries but the model was trained on "
                        f"{model.vocab_size}; pass the vocab.txt the model was trained with (`dvc repro`)")
    words, segments = probe_words(spec)
    ids = [CLS if w == "<cls>" else SEP if w == "<sep>" else vocab.id(w) for w in words]
    unknown = [w for w in words[1:] if w != "<sep>" and w not in vocab]
    if unknown:
        warnings.warn(f"probe {spec.name!r}: {', '.join(dict.fromkeys(unknown))} not in the vocabulary; "
                      "encoded as <unk>", UnknownWordWarning, stacklevel=2)
    T = len(ids)
    max_len = model.cfg.max_len
    if T > max_len:
        raise MinibertError(f"probe {spec.name!r}: {T} tokens exceed model.max_len {max_len}; "
                            "shorten the probe sentences in params.yaml")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=device)  # (1, T)
            segs = torch.tensor([segments], device=device)  # (1, T)
            enc = model.encode(tokens, segs, torch.tensor([T], device=device))  # (1, T, H), no padding
    finally:
        model.train(was_training)
    return vocab.decode(ids), segments, enc.float().cpu()


def word_position(spec: ProbeSpec) -> int | None:
    """Position of the first occurrence of `spec.word` in the probe's token sequence."""
    if spec.word is None:
        return None
    return probe_words(spec)[0].index(spec.word.lower())


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity, clipped into [-1, 1] against rounding."""
    denom = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.clip(np.dot(u, v) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def probe_table(encoded: list[tuple[ProbeSpec, list[str], list[int], np.ndarray]]) -> pd.DataFrame:
    """One row per token of every probe: probe, word, token, position, segment, norm, v0..v3."""
    rows = []
    for spec, tokens, segments, vecs in encoded:  # vecs (T, H)
        words = probe_words(spec)[0]
        for t, (tok, seg) in enumerate(zip(tokens, segments)):
            row = {"probe": spec.name, "word": words[t], "token": tok, "position": t, "segment": seg,
                   "norm": float(np.linalg.norm(vecs[t]))}
            row.update({f"v{i}": float(vecs[t, i]) for i in range(min(N_VALUES, vecs.shape[1]))})
            rows.append(row)
    return pd.DataFrame(rows)


def similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row with every other: (n, H) -> (n, n)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (n, 1)
    unit = vectors / np.where(norms > 0, norms, 1.0)  # (n, H)
    return np.clip(unit @ unit.T, -1.0, 1.0)  # (n, n)


def run_probes(model: torch.nn.Module, vocab: Vocab, cfg: ProbeConfig, device: str | torch.device | None = None
               ) -> tuple[pd.DataFrame, dict, np.ndarray, list[str]]:
    """Encode every probe -> (table, metrics, token-by-token similarity (n, n), labels `probe:token`)."""
    encoded, per_probe, word_vecs = [], {}, {}
    for spec in cfg.sentences:
        tokens, segments, enc = encode_probe(model, vocab, spec, device)
        vecs = enc[0].numpy().astype(np.float64)  # (T, H)
        encoded.append((spec, tokens, segments, vecs))
        entry = {"shape": list(enc.shape), "tokens": len(tokens), "unknown": tokens.count("<unk>"),
                 "cls_norm": float(np.linalg.norm(vecs[0]))}
        pos = word_position(spec)
        if pos is not None:
            word_vecs[spec.name] = (spec.word.lower(), vecs[pos])
            entry.update({"word": spec.word.lower(), "word_position": pos,
                          "word_norm": float(np.linalg.norm(vecs[pos]))})
        per_probe[spec.name] = entry
    similarity = {}
    names = list(word_vecs)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            (wp, vp), (wq, vq) = word_vecs[p], word_vecs[q]
            if wp == wq:  # the same word in two contexts: the book's crane comparison
                similarity[f"{p}~{q}.{wp}"] = cosine(vp, vq)
    table = probe_table(encoded)
    all_vecs = np.concatenate([v for *_, v in encoded])  # (sum T, H)
    labels = [f"{spec.name}:{tok}" for spec, tokens, _, _ in encoded for tok in tokens]
    metrics = {"probes": per_probe, "similarity": similarity}
    return table, metrics, similarity_matrix(all_vecs), labels


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Scalars of `run_probes`'s metrics under MLflow-legal names (`~` is not allowed there)."""
    out = {}
    for name, entry in metrics["probes"].items():
        for k in ("tokens", "unknown", "cls_norm", "word_norm"):
            if k in entry:
                out[f"probe_{k}.{name}"] = entry[k]
    for key, v in metrics["similarity"].items():
        out[f"probe_similarity.{key.replace('~', '-vs-')}"] = v
    for name, models in metrics.get("word_similarity", {}).items():  # word_rho_<kind>.<dataset>[_untrained]
        for which, figures in models.items():
            for k, v in figures.items():
                if k.startswith("spearman_"):
                    out[f"word_rho_{k.removeprefix('spearman_')}.{name}" + ("" if which == "trained" else f"_{which}")] = v
    return {"".join(c if c.isalnum() or c in "_-. /:" else "_" for c in k): v for k, v in out.items()}
