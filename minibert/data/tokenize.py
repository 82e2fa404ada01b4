"""The tokenize stage, streaming: raw text in byte shards → vocabulary counts and id arrays.

`count_shard` counts one byte shard of the train file (the vocabulary is the merged counts: one
pass, no token list kept), `encode_shard` writes one shard's ids and lengths as raw part files, and
`write_split` concatenates the parts, in shard order, into the split's safetensors file (the layout
of `minibert.data.vocab`), turning lengths into running offsets. Counting and encoding are per line, so
the bytes are the same for any shard size or worker count, and equal `encode_paragraphs`'s.
"""
from __future__ import annotations

from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from minibert.data.corpus import paragraph
from minibert.data.shards import ByteShard, shard_lines, write_safetensors
from minibert.data.vocab import UNK, Vocab



def count_shard(shard: ByteShard) -> Counter:
    """Token counts of the paragraphs (book's rule) in one byte shard."""
    counts: Counter = Counter()
    for line in shard_lines(shard):
        for sent in paragraph(line) or ():
            counts.update(sent)
    return counts


def encode_shard(shard: ByteShard, vocab_path: str, prefix: str) -> dict[str, int]:
    """Encode one byte shard: `<prefix>.ids` (int32), `.slen` (int64 tokens per sentence) and
    `.plen` (int64 sentences per paragraph), raw little-endian; return its counts."""
    index = Vocab.load(vocab_path)._index
    ids, slen, plen = array("i"), array("q"), array("q")
    for line in shard_lines(shard):
        if (para := paragraph(line)) is None:
            continue
        plen.append(len(para))
        for sent in para:
            slen.append(len(sent))
            ids.extend([index.get(t, UNK) for t in sent])
    for suffix, arr in ((".ids", ids), (".slen", slen), (".plen", plen)):
        with open(prefix + suffix, "wb") as f:
            arr.tofile(f)  # native order: little-endian on every platform torch supports, like safetensors
    return {"paragraphs": len(plen), "sentences": len(slen), "tokens": len(ids), "unk": ids.count(UNK)}


def _offsets(prefixes: list[str], suffix: str):
    """Running offsets over the shards' length files: 0, then each shard's cumsum plus the base."""
    def chunks():
        yield np.zeros(1, np.int64)
        base = 0
        for p in prefixes:
            lengths = np.fromfile(p + suffix, dtype="<i8")
            if len(lengths):
                off = np.cumsum(lengths) + base
                base = int(off[-1])
                yield off
    return chunks


def write_split(path: str | Path, prefixes: list[str], counts: dict[str, int], vocab_sha256: str) -> None:
    """Concatenate the shards' parts into `{ids, sentence_offsets, paragraph_offsets}` (module doc)."""
    fields = {
        "ids": (np.int32, (counts["tokens"],), lambda: (np.fromfile(p + ".ids", dtype="<i4") for p in prefixes)),
        "sentence_offsets": (np.int64, (counts["sentences"] + 1,), _offsets(prefixes, ".slen")),
        "paragraph_offsets": (np.int64, (counts["paragraphs"] + 1,), _offsets(prefixes, ".plen")),
    }
    write_safetensors(path, fields, {"vocab_sha256": vocab_sha256})
