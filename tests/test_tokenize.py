"""minibert.data.tokenize: the streamed tokenize (byte shards, pool) gives the in-memory path's bytes —
`read_paragraphs` + `build_vocab` + `encode_paragraphs` + `save_arrays` — for any shard size and
worker count."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from minibert.artifacts import save_arrays
from minibert.data.corpus import read_paragraphs
from minibert.data.shards import byte_shards, pool_map
from minibert.data.tokenize import count_shard, encode_shard, write_split
from minibert.data.vocab import UNK, build_vocab, encode_paragraphs, vocab_from_counts


def wikitext_like(rng, n_lines=99) -> str:
    """Headings, blank lines, one-sentence lines and paragraphs; words from a skewed pool."""
    words = [f"w{i}" for i in range(37)] + ["<unk>", "Caps", "é"]
    lines = []
    for i in range(n_lines):
        kind = i % 5
        if kind == 0:
            lines.append(" = Heading = \n")
        elif kind == 1:
            lines.append(" \n")
        else:
            sents = [" ".join(rng.choice(words, rng.integers(1, 13), p=None)) for _ in range(rng.integers(1, 6))]
            lines.append(" " + " . ".join(sents) + " . \n")
    return "".join(lines)


def streamed(raw, out, shard_bytes, n_workers, min_freq=2):
    shards = byte_shards(raw, shard_bytes)
    vocab = vocab_from_counts(sum(pool_map(count_shard, [(s,) for s in shards], n_workers), Counter()), min_freq)
    vocab.save(out / "vocab.txt")
    prefixes = [str(out / f"part-{i}") for i in range(len(shards))]
    counts = pool_map(encode_shard, [(s, str(out / "vocab.txt"), p) for s, p in zip(shards, prefixes)], n_workers)
    total = {k: sum(c[k] for c in counts) for k in ("paragraphs", "sentences", "tokens", "unk")}
    write_split(out / "train.safetensors", prefixes, total, vocab.sha256)
    return vocab, total, len(shards)


@pytest.mark.parametrize("shard_bytes,n_workers", [(37, 1), (37, 2), (99, 2), (1 << 20, 1)])
def test_streamed_tokenize_has_the_in_memory_bytes(tmp_path, shard_bytes, n_workers):
    raw = tmp_path / "wiki.train.tokens"
    raw.write_text(wikitext_like(np.random.default_rng(13)), encoding="utf-8")
    paragraphs = read_paragraphs(raw)
    ref_vocab = build_vocab(paragraphs, 2)
    ref = encode_paragraphs(paragraphs, ref_vocab)
    save_arrays(tmp_path / "ref.safetensors", ref, {"vocab_sha256": ref_vocab.sha256})
    out = tmp_path / "out"
    out.mkdir()
    vocab, total, n_shards = streamed(raw, out, shard_bytes, n_workers)
    assert shard_bytes > 1000 or n_shards > 20  # the small sizes really cut the file
    assert vocab.tokens == ref_vocab.tokens
    assert (out / "train.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert total == {"paragraphs": len(ref["paragraph_offsets"]) - 1, "sentences": len(ref["sentence_offsets"]) - 1,
                     "tokens": len(ref["ids"]), "unk": int((ref["ids"] == UNK).sum())}
