"""pairs: token ids → fixed-shape NSP pairs with static MLM masks, one safetensors file per split.

The train split is drawn from `pairs.seed`; valid and test from `pairs.heldout_seed`, so held-out
figures stay comparable when only the training seed changes. Each split is cut into shards of about
`pairs.shard_tokens` tokens, paired by a process pool (`data.workers`) and concatenated in shard
order: memory is bounded by one shard per worker, and NSP negatives come from the same shard
(`minibert.data.pairs`, "Shards").
"""
import shutil
from pathlib import Path

import typer

from minibert import layout
from minibert.artifacts import atomic_dir, write_json
from minibert.config import load_config
from minibert.data.corpus import SPLITS
from minibert.errors import DataError, stage_errors
from minibert.data.pairs import pairs_shard, paragraph_shards, sums_stats, write_pairs
from minibert.data.shards import open_safetensors, pool_map, workers
from minibert.data.vocab import Vocab

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(layout.PARAMS, help="params file"),
         tokens: Path = typer.Option(layout.TOKENS, help="output folder of the tokenize stage"),
         out: Path = typer.Option(layout.PAIRS, help="output folder"),
         metrics: Path = typer.Option(layout.METRICS, help="metrics folder")) -> None:
    with stage_errors("pairs"):
        root = load_config(params)
        cfg = root.pairs
        vocab = Vocab.load(tokens / "vocab.txt")
        jobs = []
        with atomic_dir(out) as tmp:
            (tmp / ".parts").mkdir()
            for split in SPLITS:
                path = tokens / f"{split}.safetensors"
                if not path.is_file():
                    raise DataError(f"{path}: token ids not found; run `dvc repro tokenize` first")
                arrays, _ = open_safetensors(path)
                seed = cfg.seed if split == "train" else cfg.heldout_seed
                for i, (lo, hi) in enumerate(paragraph_shards(arrays["sentence_offsets"], arrays["paragraph_offsets"],
                                                              cfg.shard_tokens)):
                    prefix = str(tmp / f".parts/{split}-{i:05d}")
                    jobs.append((split, (str(path), lo, hi, cfg, len(vocab), seed, i, prefix)))
            sums = pool_map(pairs_shard, [args for _, args in jobs], workers(root.data.workers))
            stats, shards = {}, {}
            for split in SPLITS:
                mine = [(args[-1], s) for (sp, args), s in zip(jobs, sums) if sp == split]
                n = sum(s["pairs"] for _, s in mine)
                write_pairs(tmp / f"{split}.safetensors", [p for p, _ in mine], n, cfg, vocab.sha256)
                stats.update({f"{split}_{k}": v for k, v in sums_stats([s for _, s in mine]).items()})
                shards[split] = len(mine)
            shutil.rmtree(tmp / ".parts")
        write_json(metrics / "pairs.json", stats)
        print("pairs: " + ", ".join(f"{s} {stats[f'{s}_pairs']} ({shards[s]} shard{'s' * (shards[s] > 1)})"
                                    for s in SPLITS))


if __name__ == "__main__":
    app()
