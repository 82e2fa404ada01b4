"""What drawing NSP negatives within a shard changes: how often a negative comes from a's own article.

    python -m bench.nsp_shards [--data DIR_OR_ZIP] [--shard-tokens 4000000,1000000,250000,60000]

The book draws a negative `b` from the whole corpus; the pairs stage draws it from a's shard
(`minibert.data.pairs`, "Shards"). A negative from a's own article shares its topic and is harder to tell
from the true next sentence, so the share of same-article negatives is what shards move. This script
replays the pairs stage's draws on WikiText-2's train split (the same `paragraph_shards`, `shard_rng`,
`candidate_pairs`, `choose_next`, and the max_len filter) and reports, per shard size, the share of
kept negatives whose b lies in a's article (articles: WikiText's ` = Title = ` headings), next to what
the whole corpus gives. A measurement, not a test: it prints one JSON line per shard size.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from bench.data import SHARED, data_dir
from minibert.config import PairsConfig, VocabConfig
from minibert.data.corpus import paragraph, split_file
from minibert.data.pairs import candidate_pairs, choose_next, paragraph_shards, shard_rng
from minibert.data.vocab import build_vocab, encode_paragraphs

TITLE = re.compile(r"^ = [^=].* = $")


def articles(path) -> tuple[list, np.ndarray]:
    """The book's paragraphs and, for each, the index of the article (level-1 heading) it is in."""
    paras, art, current = [], [], -1
    with open(path, encoding="utf-8") as f:
        for line in f:
            if TITLE.match(line.rstrip("\n")):
                current += 1
            elif (p := paragraph(line)) is not None:
                paras.append(p)
                art.append(current)
    return paras, np.array(art)


def same_article_share(split, art: np.ndarray, shard_tokens: int, cfg: PairsConfig) -> tuple[float, int, int]:
    sent_off, para_off = split["sentence_offsets"], split["paragraph_offsets"]
    sent_para = np.repeat(np.arange(len(para_off) - 1), np.diff(para_off))  # sentence → paragraph
    lengths = np.diff(sent_off)
    same = total = 0
    shards = paragraph_shards(sent_off, para_off, shard_tokens)
    for i, (lo, hi) in enumerate(shards):
        po = para_off[lo:hi + 1] - para_off[lo]
        rng = shard_rng(cfg.seed, i)
        a = candidate_pairs(po, rng.permutation(hi - lo))
        b, nsp = choose_next(a, po, rng)
        a, b = a + para_off[lo], b + para_off[lo]
        keep = (lengths[a] + lengths[b] + 3 <= cfg.max_len) & (nsp == 0)
        same += int((art[sent_para[a[keep]]] == art[sent_para[b[keep]]]).sum())
        total += int(keep.sum())
    return same / total, total, len(shards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("MINIBERT_DATA", str(SHARED / "data/wikitext-2")))
    ap.add_argument("--shard-tokens", default="4000000,1000000,250000,60000")
    a = ap.parse_args()
    paras, art = articles(split_file(data_dir(a.data), "train"))
    split = encode_paragraphs(paras, build_vocab(paras, VocabConfig().min_freq))
    cfg = PairsConfig()
    for st in map(int, a.shard_tokens.split(",")):
        share, n, shards = same_article_share(split, art, st, cfg)
        print(json.dumps({"shard_tokens": st, "shards": shards, "negatives": n, "articles": int(art.max()) + 1,
                          "same_article_share": round(share, 4)}))


if __name__ == "__main__":
    main()
