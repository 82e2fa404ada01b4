"""pairs: token ids → fixed-shape NSP pairs with static MLM masks, one safetensors file per split.

The train split is drawn from `pairs.seed`; valid and test from `pairs.heldout_seed`, so held-out
figures stay comparable when only the training seed changes. Each split is cut into shards of about
`pairs.shard_tokens` tokens, paired by a process pool (`data.workers`) and concatenated in shard
order: memory is bounded by one shard per worker, and NSP negatives come from the same shard
(`minibert.data.pairs`, "Shards").
"""
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import write_json
from minibert.config import load_config
from minibert.data.corpus import SPLITS
from minibert.data.pairs import pairs_splits
from minibert.data.shards import workers
from minibert.errors import stage_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         tokens: Path = typer.Option(layout.TOKENS, help="output folder of the tokenize stage"),
         out: Path = typer.Option(layout.PAIRS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("pairs"):
        root = load_config(params)
        cfg = root.pairs
        stats, shards = pairs_splits(tokens, out, cfg, workers(root.data.workers), SPLITS)
        write_json(metrics / "pairs.json", stats)
        print("pairs: " + ", ".join(f"{s} {stats[f'{s}_pairs']} ({shards[s]} shard{'s' * (shards[s] > 1)})"
                                    for s in SPLITS))


if __name__ == "__main__":
    app()
