"""tokenize: raw WikiText-2 → vocabulary, id arrays per split, corpus statistics.

Reads data/raw/wikitext-2/wiki.{train,valid,test}.tokens; writes data/tokens/ (vocab.txt,
{split}.safetensors), metrics/corpus_stats.csv and metrics/corpus.json (vocab_size, per-split counts).
"""
from pathlib import Path

import pandas as pd
import typer

from minibert import layout
from minibert.artifacts import atomic_dir, atomic_path, save_arrays, write_json
from minibert.config import load_config
from minibert.corpus import SPLITS, read_paragraphs, split_file
from minibert.errors import DataError, stage_errors
from minibert.vocab import build_vocab, encode_paragraphs, split_stats

app = typer.Typer(add_completion=False)


def read(raw: Path, split: str) -> list:
    path = split_file(raw, split)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro download` first (or set MINIBERT_DATA)")
    paragraphs = read_paragraphs(path)
    if split == "train" and not paragraphs:
        raise DataError(f"{path}: no paragraphs (a line with two ' . '-separated sentences); is the file empty?")
    return paragraphs


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         raw: Path = typer.Option(layout.RAW, help="folder with wiki.*.tokens"),
         out: Path = typer.Option(layout.TOKENS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("tokenize"):
        cfg = load_config(params)
        paragraphs = {split: read(raw, split) for split in SPLITS}
        vocab = build_vocab(paragraphs["train"], cfg.vocab.min_freq)
        rows = []
        with atomic_dir(out) as tmp:
            vocab.save(tmp / "vocab.txt")
            for split in SPLITS:
                arrays = encode_paragraphs(paragraphs[split], vocab)
                save_arrays(tmp / f"{split}.safetensors", arrays, {"vocab_sha256": vocab.sha256})
                rows.append({"split": split, **split_stats(arrays)})
        with atomic_path(metrics / "corpus_stats.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        flat = {f"{r['split']}_{k}": v for r in rows for k, v in r.items() if k != "split"}
        write_json(metrics / "corpus.json", {"vocab_size": len(vocab), "vocab_sha256": vocab.sha256, **flat})
        print(f"tokenize: vocab {len(vocab)}; " + ", ".join(
            f"{r['split']} {r['paragraphs']} paragraphs / {r['tokens']} tokens" for r in rows))


if __name__ == "__main__":
    app()
