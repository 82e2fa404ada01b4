"""tokenize: raw corpus → vocabulary, id arrays per split, corpus statistics.

Reads data/raw/corpus/wiki.{train,valid,test}.tokens; writes data/tokens/ (vocab.txt,
{split}.safetensors), metrics/corpus_stats.csv and metrics/corpus.json (vocab_size, per-split counts).
Streams: each split is cut into byte shards (`SHARD_BYTES`), a process pool (`data.workers`) counts
the train shards (one pass, merged counts → vocabulary) then encodes every shard to part files that
are concatenated in shard order. Memory is bounded by one shard per worker; the bytes do not depend
on the shard size or the number of workers (`minibert.data.tokenize`).
"""
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import typer

from minibert import layout
from minibert.artifacts import atomic_dir, atomic_path, write_json
from minibert.config import load_config
from minibert.data.corpus import SPLITS, split_file
from minibert.errors import DataError, stage_errors
from minibert.data.shards import byte_shards, pool_imap, pool_map, workers
from minibert.data.tokenize import count_shard, encode_shard, write_split
from minibert.data.vocab import count_stats, vocab_from_counts

SHARD_BYTES = 4 << 20  # ~0.7M WikiText tokens: a few MB of ids per worker; WikiText-2's train file is 3 shards

app = typer.Typer(add_completion=False)


def shards_of(raw: Path, split: str) -> list:
    path = split_file(raw, split)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro download` first (or set MINIBERT_DATA)")
    return byte_shards(path, SHARD_BYTES)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         raw: Path = typer.Option(layout.RAW, help="folder with wiki.*.tokens"),
         out: Path = typer.Option(layout.TOKENS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("tokenize"):
        cfg = load_config(params)
        n = workers(cfg.data.workers)
        shards = {split: shards_of(raw, split) for split in SPLITS}
        counts: Counter = Counter()
        for shard_counts in pool_imap(count_shard, [(s,) for s in shards["train"]], n):
            counts.update(shard_counts)  # folded as they come: one shard's Counter alive at a time
        if not counts:
            raise DataError(f"{split_file(raw, 'train')}: no paragraphs (a line with two ' . '-separated "
                            "sentences); is the file empty?")
        vocab = vocab_from_counts(counts, cfg.vocab.min_freq)
        rows = []
        with atomic_dir(out) as tmp:
            vocab.save(tmp / "vocab.txt")
            parts = tmp / ".parts"
            parts.mkdir()
            jobs = [(split, shard, str(parts / f"{split}-{i:05d}"))
                    for split in SPLITS for i, shard in enumerate(shards[split])]
            done = pool_map(encode_shard, [(shard, str(tmp / "vocab.txt"), p) for _, shard, p in jobs], n)
            for split in SPLITS:
                mine = [(p, c) for (s, _, p), c in zip(jobs, done) if s == split]
                total = {k: sum(c[k] for _, c in mine) for k in ("paragraphs", "sentences", "tokens", "unk")}
                write_split(tmp / f"{split}.safetensors", [p for p, _ in mine], total, vocab.sha256)
                rows.append({"split": split, **count_stats(**total)})
            shutil.rmtree(parts)
        with atomic_path(metrics / "corpus_stats.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        flat = {f"{r['split']}_{k}": v for r in rows for k, v in r.items() if k != "split"}
        write_json(metrics / "corpus.json", {"vocab_size": len(vocab), "vocab_sha256": vocab.sha256, **flat})
        print(f"tokenize: vocab {len(vocab)}; " + ", ".join(
            f"{r['split']} {r['paragraphs']} paragraphs / {r['tokens']} tokens" for r in rows))


if __name__ == "__main__":
    app()
