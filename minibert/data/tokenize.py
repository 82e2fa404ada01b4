"""The tokenize stage, streaming: raw text in byte shards → vocabulary counts and id arrays.

`count_shard` counts one byte shard of the train file (the vocabulary is the merged counts: one
pass, no token list kept), `encode_shard` writes one shard's ids and lengths as raw part files, and
`write_split` concatenates the parts, in shard order, into the split's safetensors file (the layout
of `minibert.data.vocab`), turning lengths into running offsets. Counting and encoding are per line, so
the bytes are the same for any shard size or worker count, and equal `encode_paragraphs`'s.
"""
from __future__ import annotations

import shutil
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from minibert.artifacts import atomic_dir
from minibert.data.corpus import SPLITS, paragraph, split_file
from minibert.data.shards import ByteShard, byte_shards, pool_imap, pool_map, shard_lines, write_safetensors
from minibert.data.vocab import UNK, Vocab, count_stats, vocab_from_counts
from minibert.errors import DataError

SHARD_BYTES = 4 << 20  # ~0.7M WikiText tokens: a few MB of ids per worker; WikiText-2's train file is 3 shards



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


def shards_of(raw: Path, split: str) -> list:
    path = split_file(raw, split)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro download` first (or set MINIBERT_DATA)")
    return byte_shards(path, SHARD_BYTES)


def tokenize_splits(raw: Path, out: Path, min_freq: int, n_workers: int) -> tuple[Vocab, list[dict]]:
    """The tokenize stage's work: the vocabulary of `raw`'s train split and every split's ids into the
    folder `out` (written whole or not at all); (vocabulary, one count_stats row per split)."""
    shards = {split: shards_of(raw, split) for split in SPLITS}
    counts: Counter = Counter()
    for shard_counts in pool_imap(count_shard, [(s,) for s in shards["train"]], n_workers):
        counts.update(shard_counts)  # folded as they come: one shard's Counter alive at a time
    if not counts:
        raise DataError(f"{split_file(raw, 'train')}: no paragraphs (a line with two ' . '-separated "
                        "sentences); is the file empty?")
    vocab = vocab_from_counts(counts, min_freq)
    rows = []
    with atomic_dir(out) as tmp:
        vocab.save(tmp / "vocab.txt")
        parts = tmp / ".parts"
        parts.mkdir()
        jobs = [(split, shard, str(parts / f"{split}-{i:05d}"))
                for split in SPLITS for i, shard in enumerate(shards[split])]
        done = pool_map(encode_shard, [(shard, str(tmp / "vocab.txt"), p) for _, shard, p in jobs], n_workers)
        for split in SPLITS:
            mine = [(p, c) for (s, _, p), c in zip(jobs, done) if s == split]
            total = {k: sum(c[k] for _, c in mine) for k in ("paragraphs", "sentences", "tokens", "unk")}
            write_split(tmp / f"{split}.safetensors", [p for p, _ in mine], total, vocab.sha256)
            rows.append({"split": split, **count_stats(**total)})
        shutil.rmtree(parts)
    return vocab, rows
