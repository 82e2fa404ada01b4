"""tokenize: raw corpus → vocabulary, id arrays per split, corpus statistics.

Reads data/raw/corpus/wiki.{train,valid,test}.tokens; writes data/tokens/ (vocab.txt,
{split}.safetensors), metrics/corpus_stats.csv and metrics/corpus.json (vocab_size, per-split counts).
Streams: each split is cut into byte shards (`SHARD_BYTES`), a process pool (`data.workers`) counts
the train shards (one pass, merged counts → vocabulary) then encodes every shard to part files that
are concatenated in shard order. Memory is bounded by one shard per worker; the bytes do not depend
on the shard size or the number of workers (`minibert.data.tokenize`).
"""
from pathlib import Path

import pandas as pd
import typer

from minibert import layout
from minibert.artifacts import atomic_path, write_json
from minibert.config import load_config
from minibert.data.shards import workers
from minibert.data.tokenize import tokenize_splits
from minibert.errors import stage_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         raw: Path = typer.Option(layout.RAW, help="folder with wiki.*.tokens"),
         out: Path = typer.Option(layout.TOKENS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("tokenize"):
        cfg = load_config(params)
        vocab, rows = tokenize_splits(raw, out, cfg.vocab.min_freq, workers(cfg.data.workers))
        with atomic_path(metrics / "corpus_stats.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        flat = {f"{r['split']}_{k}": v for r in rows for k, v in r.items() if k != "split"}
        write_json(metrics / "corpus.json", {"vocab_size": len(vocab), "vocab_sha256": vocab.sha256, **flat})
        print(f"tokenize: vocab {len(vocab)}; " + ", ".join(
            f"{r['split']} {r['paragraphs']} paragraphs / {r['tokens']} tokens" for r in rows))


if __name__ == "__main__":
    app()
