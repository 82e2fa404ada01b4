"""Does pretraining transfer? Recipes pretrained for a number of steps, then fine-tuned on real tasks
beside their controls, and their word vectors scored against human judgements.

    python -m bench.transfer [--recipes book:50,book:500,budget:2273] [--tasks bbc,polarity] [--seeds 0,1,2]
                             [--pretrain-seed 0] [--out DIR] [--smoke]

Each `RECIPE:STEPS` (a preset of params.yaml, its schedule fitted to STEPS as `minibert budget` would;
`book:500` is the book's recipe run ten times longer) is pretrained once with `fit` on the pipeline's
pairs (data/pairs/, else made in-process), scored on the full valid split, then fine-tuned on each task
with the finetune stage's own code (`minibert.downstream.finetune.run`: the pretrained encoder, the
same architecture from random initialisation, bag-of-words and the majority class on the same split,
one fine-tuning per seed) and its word vectors scored on SimLex-999 and WordSim-353 against its
untrained initialisation. Task data: MINIBERT_TASK_DATA or the pinned downloads.

Writes to `--out` (default bench/results/<date>-transfer-<commit>/): rows.jsonl (one line per recipe,
task, system and seed) and table.md (mean ± std over seeds, the CPU kind). `--smoke`: synthetic pairs,
a tiny model and a generated task, in seconds (for the test).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import DEFAULT_DATA, DEVICE, load_splits
from bench.time_to_quality import ROOT, commit, int_list, recipe_config, smoke_data
from bench.train import cpu_kind
from minibert import layout
from minibert.config import FinetuneConfig
from minibert.data.batches import to_tensors
from minibert.data.vocab import SPECIALS, Vocab
from minibert.downstream.finetune import SYSTEMS, load_task, run
from minibert.evaluation.heldout import evaluate
from minibert.evaluation.similarity import word_similarity
from minibert.model.bert import build_model
from minibert.training import distributed
from minibert.training.heap import tune_cpu_malloc
from minibert.training.loop import fit, make_optimizer

WORD_SETS = ("simlex999", "wordsim353")


def parse_recipes(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.rpartition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"bench.transfer: --recipes {item!r}: write RECIPE:STEPS (a preset and a step count)")
        out.append((name, int(steps)))
    return out


def pretrain(cfg, train: dict, vocab_size: int, seed: int, steps: int) -> torch.nn.Module:
    tcfg = dataclasses.replace(cfg.train, seed=seed, max_steps=steps)
    model = build_model(cfg.model, vocab_size, seed=seed).to(DEVICE)
    fit(model, make_optimizer(model.parameters(), tcfg), tcfg, to_tensors(train, DEVICE), DEVICE,
        distributed.Dist(), vocab_size=vocab_size)
    return model


def smoke_task(folder: Path, vocab: Vocab) -> FinetuneConfig:
    """A generated 3-class file over the smoke vocabulary: class c writes words of its own third."""
    rng = np.random.default_rng(13)
    words = vocab.tokens[len(SPECIALS):]
    third = len(words) // 3
    lines = ["text\tlabel"]
    for _ in range(99):
        c = int(rng.integers(0, 3))
        lines.append(" ".join(words[c * third + int(rng.integers(0, third))] for _ in range(5)) + f"\tc{c}")
    (folder / "smoke.tsv").write_text("\n".join(lines) + "\n")
    return FinetuneConfig(task="file", train_file=str(folder / "smoke.tsv"), max_len=29, epochs=2, batch_size=13)


def summary(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{np.mean(vals):.3f} ± {std:.3f}"


def table(rows: list[dict], pre: dict, header: str) -> str:
    lines = [header, "", "| recipe | held-out MLM loss | task | " + " | ".join(SYSTEMS) + " |",
             "|---|---|---|" + "---|" * len(SYSTEMS)]
    for (recipe, task) in dict.fromkeys((r["recipe"], r["task"]) for r in rows):
        cells = [summary([r for r in rows if (r["recipe"], r["task"], r["system"]) == (recipe, task, s)], "accuracy")
                 for s in SYSTEMS]
        lines.append(f"| {recipe} | {pre[recipe]['mlm_loss']:.3f} | {task} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy on the held-out split, mean ± std over the fine-tuning seeds (majority: one value)."]
    sets = list(next(iter(pre.values()))["words"])
    if not sets:
        return "\n".join(lines) + "\n"
    lines += ["", "| recipe | " + " | ".join(f"{w} {k}" for w in sets for k in ("embedding", "context")) + " |",
              "|---|" + "---|" * 2 * len(sets)]
    for recipe, p in pre.items():
        cells = [f"{p['words'][w]['trained'].get(f'spearman_{k}', float('nan')):.3f} "
                 f"(untrained {p['words'][w]['untrained'].get(f'spearman_{k}', float('nan')):.3f})"
                 for w in sets for k in ("embedding", "context")]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    pairs = {w: next(iter(pre.values()))["words"][w]["trained"] for w in sets}
    lines += ["", "Spearman rho of word-vector cosines against human judgements ("
              + ", ".join(f"{w}: {p['pairs']} of {p['total']} pairs in the vocabulary" for w, p in pairs.items())
              + "); the untrained initialisation of the same seed beside each."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="book:50,book:500,budget:2273")
    ap.add_argument("--tasks", default="bbc,polarity")
    ap.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    ap.add_argument("--pretrain-seed", type=int, default=0)
    ap.add_argument("--params", type=Path, default=ROOT / layout.PARAMS)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=ROOT / layout.PAIRS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="synthetic pairs, a tiny model, a generated task")
    a = ap.parse_args(argv)
    recipes, seeds = parse_recipes(a.recipes), tuple(int_list(a.seeds, "--seeds"))
    raw = yaml.safe_load(a.params.read_text()) or {}
    configs = {f"{n}:{s}": recipe_config(n, raw, a.smoke) for n, s in recipes}  # an unknown preset fails first
    tune_cpu_malloc()
    tmp = tempfile.TemporaryDirectory(prefix="minibert-bench-transfer-")
    if a.smoke:
        train, valid, V = smoke_data()
        vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(V - len(SPECIALS))))
        tasks = {"smoke": smoke_task(Path(tmp.name), vocab)}
        words: tuple[str, ...] = ()
    else:
        splits, V, _ = load_splits(("train", "valid"), a.data, a.pairs)
        train, valid = splits["train"], splits["valid"]
        vocab = Vocab.load(a.pairs.parent / layout.TOKENS.name / layout.VOCAB.name)
        tasks = {t: FinetuneConfig(task=t) for t in a.tasks.split(",")}
        words = WORD_SETS
    tasks = {t: dataclasses.replace(c, seeds=seeds) for t, c in tasks.items()}
    data = {t: load_task(c) for t, c in tasks.items()}  # a missing task file fails before any training
    kind = cpu_kind(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    out_dir = a.out or ROOT / "bench/results" / f"{datetime.date.today()}-transfer-{commit()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, pre = [], {}
    for (_, steps), (label, cfg) in zip(recipes, configs.items()):
        model = pretrain(cfg, train, V, a.pretrain_seed, steps)
        held = evaluate(model, valid, cfg.eval.batch_size, DEVICE, progress=False)
        untrained = build_model(cfg.model, V, seed=a.pretrain_seed).to(DEVICE)
        pre[label] = {"mlm_loss": held["mlm_loss"], "mlm_accuracy": held["mlm_accuracy"],
                      "words": word_similarity(model, untrained, vocab, words)}
        print(json.dumps({"recipe": label, **{k: v for k, v in pre[label].items()}}), file=sys.stderr, flush=True)
        for task, fcfg in tasks.items():
            train_df, test_df, origin = data[task]
            result = run(fcfg, lambda: copy.deepcopy(model), vocab, train_df, test_df, origin,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
            for r in result.per_seed.to_dict("records"):
                rows.append({"recipe": label, "steps": steps, "task": task, "data": origin,
                             "train_examples": len(train_df), "test_examples": len(test_df), **r})
    tmp.cleanup()
    header = (f"Transfer ({datetime.date.today()}): {kind}, {torch.get_num_threads()} threads; pretrain seed "
              f"{a.pretrain_seed}, fine-tuning seeds {list(seeds)}; "
              + ", ".join(f"{t}: {len(d[0])} train / {len(d[1])} test ({d[2]})" for t, d in data.items())
              + ("; smoke: synthetic pairs, tiny model, generated task" if a.smoke else ""))
    with open(out_dir / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.writelines(json.dumps({"recipe": k, "pretrained": v}) + "\n" for k, v in pre.items())
    (out_dir / "table.md").write_text(table(rows, pre, header))
    print(table(rows, pre, header))
    return out_dir


if __name__ == "__main__":
    main()
