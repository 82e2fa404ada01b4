"""The vocabulary, and paragraphs turned into compact id arrays.

Order (documented contract, one token per line in `vocab.txt`, id = line number):
the five specials `<pad>` 0, `<unk>` 1, `<mask>` 2, `<cls>` 3, `<sep>` 4; then every train token
seen at least `min_freq` times, most frequent first, ties in code-point order. `<pad>` at 0 lets
zero-filled arrays mean padding. WikiText-2 already contains literal `<unk>` tokens: they map to the
special, so the set of entries is the book's (20256 on WikiText-2 with min_freq 5).

A split on disk is three flat arrays instead of nested lists (loads in milliseconds, hashes the same
everywhere): `ids` (all tokens, int32), `sentence_offsets` (n_sentences + 1) and
`paragraph_offsets` (n_paragraphs + 1, in sentences).
The tokenize stage streams these same arrays shard by shard: `minibert.data.tokenize`.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minibert.artifacts import atomic_path
from minibert.errors import DataError

SPECIALS = ("<pad>", "<unk>", "<mask>", "<cls>", "<sep>")
PAD, UNK, MASK, CLS, SEP = range(len(SPECIALS))

Paragraphs = list[list[list[str]]]  # paragraph → sentence → token


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]

    def __post_init__(self):
        if self.tokens[: len(SPECIALS)] != SPECIALS:
            raise DataError(f"vocabulary must start with {' '.join(SPECIALS)}; rebuild it with the tokenize stage")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def id(self, token: str) -> int:
        return self._index.get(token, UNK)

    def encode(self, words: list[str]) -> list[int]:
        return [self._index.get(w, UNK) for w in words]

    def decode(self, ids) -> list[str]:
        return [self.tokens[i] for i in ids]

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary: models record it so a mismatched vocab is caught."""
        return hashlib.sha256(("\n".join(self.tokens) + "\n").encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(self.tokens) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: vocabulary not found; run `dvc repro tokenize` first")
        return cls(tuple(path.read_text(encoding="utf-8").split("\n")[:-1]))


def pair_layout(a: list, b: list | None, cls=CLS, sep=SEP) -> tuple[list, list[int]]:
    """The book's `get_tokens_and_segments`: (`<cls> a <sep>` then `b <sep>` when there is a `b`, segment
    ids 0 then 1). Of ids by default; of words with `cls="<cls>", sep="<sep>"`."""
    seq, segments = [cls, *a, sep], [0] * (len(a) + 2)
    if b is not None:
        seq += [*b, sep]
        segments += [1] * (len(b) + 1)
    return seq, segments


def pair_ids(a: list[int], b: list[int] | None, max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, segment ids) of `<cls> a <sep> [b <sep>]`, at most `max_len` long."""
    a, b = list(a), (list(b) if b is not None else None)
    room = max_len - (3 if b is not None else 2)
    while len(a) + len(b or []) > room:  # trim the longer side, as the book's _truncate_pair_of_tokens
        (a if b is None or len(a) > len(b) else b).pop()
    return pair_layout(a, b)


def build_vocab(paragraphs: Paragraphs, min_freq: int) -> Vocab:
    """The book's rule: tokens of the train sentences with count >= min_freq, plus the specials."""
    return vocab_from_counts(Counter(t for para in paragraphs for sent in para for t in sent), min_freq)


def vocab_from_counts(counts: Counter, min_freq: int) -> Vocab:
    """`build_vocab` from token counts already made (merged across shards)."""
    kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                  key=lambda t: (-counts[t], t))
    return Vocab(SPECIALS + tuple(kept))


def encode_paragraphs(paragraphs: Paragraphs, vocab: Vocab) -> dict[str, np.ndarray]:
    """Flatten paragraphs into `ids`, `sentence_offsets`, `paragraph_offsets` (see module doc)."""
    sent_lens = [len(s) for p in paragraphs for s in p]
    index = vocab._index
    ids = np.fromiter((index.get(t, UNK) for p in paragraphs for s in p for t in s),
                      dtype=np.int32, count=sum(sent_lens))
    sentence_offsets = np.zeros(len(sent_lens) + 1, dtype=np.int64)
    np.cumsum(sent_lens, out=sentence_offsets[1:])
    paragraph_offsets = np.zeros(len(paragraphs) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in paragraphs], out=paragraph_offsets[1:])
    return {"ids": ids, "sentence_offsets": sentence_offsets, "paragraph_offsets": paragraph_offsets}


def split_stats(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Paragraphs, sentences, tokens, `<unk>` rate and mean sentence length of one encoded split."""
    ids = arrays["ids"]
    return count_stats(len(arrays["paragraph_offsets"]) - 1, len(arrays["sentence_offsets"]) - 1,
                       len(ids), int(np.count_nonzero(ids == UNK)))


def count_stats(paragraphs: int, sentences: int, tokens: int, unk: int) -> dict[str, float]:
    """`split_stats` from counts summed over shards (np.mean of a bool array is the same count / n)."""
    return {
        "paragraphs": paragraphs,
        "sentences": sentences,
        "tokens": tokens,
        "unk_rate": round(unk / tokens if tokens else 0.0, 6),
        "mean_sentence_len": round(tokens / sentences, 4) if sentences else 0.0,
    }
