"""pairs: token ids → fixed-shape NSP pairs with static MLM masks, one safetensors file per split.

The train split is drawn from `pairs.seed`; valid and test from `pairs.heldout_seed`, so held-out
figures stay comparable when only the training seed changes.
"""
from pathlib import Path

import numpy as np
import typer

from minibert import layout
from minibert.artifacts import atomic_dir, load_arrays, save_arrays, write_json
from minibert.config import load_config
from minibert.corpus import SPLITS
from minibert.errors import DataError, stage_errors
from minibert.pairs import make_pairs, pair_stats
from minibert.progress import Progress
from minibert.vocab import Vocab

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         tokens: Path = typer.Option(layout.TOKENS, help="output folder of the tokenize stage"),
         out: Path = typer.Option(layout.PAIRS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("pairs"):
        cfg = load_config(params).pairs
        vocab = Vocab.load(tokens / "vocab.txt")
        stats = {}
        with atomic_dir(out) as tmp, Progress("pairs", len(SPLITS), "splits") as bar:
            for split in SPLITS:
                path = tokens / f"{split}.safetensors"
                if not path.is_file():
                    raise DataError(f"{path}: token ids not found; run `dvc repro tokenize` first")
                rng = np.random.default_rng(cfg.seed if split == "train" else cfg.heldout_seed)
                pairs = make_pairs(load_arrays(path), cfg, len(vocab), rng)
                save_arrays(tmp / f"{split}.safetensors", pairs, {"vocab_sha256": vocab.sha256})
                stats.update({f"{split}_{k}": v for k, v in pair_stats(pairs).items()})
                bar.advance(info=f"{split}: {len(pairs['nsp_labels'])} pairs")
        write_json(metrics / "pairs.json", stats)
        print("pairs: " + ", ".join(f"{s} {stats[f'{s}_pairs']}" for s in SPLITS))


if __name__ == "__main__":
    app()
