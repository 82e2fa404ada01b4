"""Does pretraining pay? Recipes pretrained for a number of steps, then fine-tuned on real tasks beside
their controls at several label counts, scored zero-shot on BLiMP beside theirs, and their word vectors
scored against human judgements.

    python -m bench.transfer [--recipes book:50,budget:2273] [--adapt 0,300] [--label-counts 10,30,100,0]
                             [--tasks bbc] [--seeds 0,1,2] [--pretrain-seed 0] [--set finetune.KEY=VALUE ...]
                             [--blimp-max-pairs N] [--models DIR] [--out DIR] [--smoke]

Each `RECIPE:STEPS` (a preset of params.yaml, its schedule fitted to STEPS as `minibert budget` would;
`book:500` is the book's recipe run ten times longer) is pretrained once with `fit` on the pipeline's
pairs (data/pairs/, else made in-process) and kept in `--models` (default ~/.cache/minibert/bench-models,
keyed by the recipe's config, the steps and the seed, so a second run fine-tunes without pretraining
again), scored on the full valid split and on BLiMP (`minibert.evaluation.blimp`: pseudo-log-likelihood,
beside its untrained initialisation and the unigram model of the training words), then fine-tuned on
each task with the finetune stage's own code (`minibert.downstream.finetune.run`) once per value of
`--adapt` (task-adaptive MLM steps on the training texts first; 0 = none), for every labels-per-class
count and seed. The controls (random init of the same architecture, bag-of-words, majority) do not
depend on the pretraining: they run once per architecture. `--set finetune.pooling=mean` and the like
change the fine-tuning recipe for every system. Task data: MINIBERT_TASK_DATA or the pinned downloads.

Writes to `--out` (default bench/results/<date>-transfer-<commit>/): rows.jsonl (one line per recipe,
adapt, task, labels, system and seed; one per recipe with its pretraining figures) and table.md (mean ±
std over seeds, wall times, the CPU kind). `--smoke`: synthetic pairs, a tiny model, a generated task
and no BLiMP or word sets, in seconds (for the test).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import DEFAULT_DATA, DEVICE, load_splits
from bench.time_to_quality import ROOT, commit, int_list, recipe_config, smoke_data
from bench.train import cpu_kind
from minibert import layout
from minibert.config import FinetuneConfig
from minibert.data.pinned import locate
from minibert.data.vocab import SPECIALS, Vocab
from minibert.downstream.finetune import SYSTEMS, load_task, run
from minibert.evaluation import blimp
from minibert.evaluation.heldout import evaluate
from minibert.evaluation.similarity import word_similarity
from minibert.model.bert import build_model, load_pretrained, save_pretrained
from minibert.training.heap import tune_cpu_malloc
from minibert.training.train import train_model

WORD_SETS = ("simlex999", "wordsim353")
STORE = Path.home() / ".cache/minibert/bench-models"
CONTROLS = ("random_init", "bag_of_words")


def parse_recipes(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.rpartition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"bench.transfer: --recipes {item!r}: write RECIPE:STEPS (a preset and a step count)")
        out.append((name, int(steps)))
    return out


def finetune_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("finetune.") or key.count(".") != 1:
            raise SystemExit(f"bench.transfer: --set {item!r}: write finetune.KEY=VALUE")
        v = yaml.safe_load(value)
        out[key.split(".", 1)[1]] = tuple(v) if isinstance(v, list) else v
    return out


def pretrained(cfg, train: dict, valid: dict, vocab_size: int, seed: int, steps: int, store: Path | None):
    """(model, {mlm_loss, mlm_accuracy, nsp…, pretrain_s}): from `store` when this config, step count and
    seed were pretrained before, else trained now (and kept there)."""
    tcfg = dataclasses.replace(cfg.train, seed=seed, max_steps=steps)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(tcfg), vocab_size],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = store / key if store else None
    if folder and (folder / "bert.json").is_file():
        model, meta = load_pretrained(folder, DEVICE)
        return model, {k: meta[k] for k in ("mlm_loss", "mlm_accuracy", "pretrain_s", "threads")}
    t0 = time.perf_counter()
    model, _ = train_model(cfg.model, tcfg, train, vocab_size, device=DEVICE)
    figures = {**{k: v for k, v in evaluate(model, valid, cfg.eval.batch_size, DEVICE, progress=False).items()
                  if k in ("mlm_loss", "mlm_accuracy")},
               "pretrain_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    if folder:
        save_pretrained(model, folder, figures)
    return model, figures


def smoke_task(folder: Path, vocab: Vocab) -> FinetuneConfig:
    """A generated 3-class file over the smoke vocabulary: class c writes sentences of words of its own third."""
    rng = np.random.default_rng(13)
    words = vocab.tokens[len(SPECIALS):]
    third = len(words) // 3
    lines = ["text\tlabel"]
    for _ in range(99):
        c = int(rng.integers(0, 3))
        lines.append(" ".join(words[c * third + int(rng.integers(0, third))] for _ in range(5)) + " . "
                     + " ".join(words[c * third + int(rng.integers(0, third))] for _ in range(4)) + f" .\tc{c}")
    (folder / "smoke.tsv").write_text("\n".join(lines) + "\n")
    return FinetuneConfig(task="file", train_file=str(folder / "smoke.tsv"), max_len=29, epochs=3, patience=2,
                          batch_size=13, dev_share=0.2, min_epoch_examples=0)


def summary(rows: list[dict], key: str = "accuracy") -> str:
    vals = [r[key] for r in rows]
    if not vals:
        return "–"
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{np.mean(vals):.3f} ± {std:.3f}"


def table(rows: list[dict], pre: dict, header: str) -> str:
    """Markdown: pretraining figures per recipe, then accuracy per (recipe, adapt, task, labels)."""
    out = [header, "", "| recipe | pretrain s | held-out MLM | BLiMP pretrained | untrained | unigram | BLiMP pairs |"
           + " SimLex emb / ctx | WordSim emb / ctx |", "|---|---|---|---|---|---|---|---|---|"]
    for label, p in pre.items():
        b, w = p.get("blimp") or {}, p.get("words") or {}
        acc = [f"{b[s]['accuracy']:.3f}" if b else "–" for s in ("pretrained", "untrained", "unigram")]
        rho = [" / ".join(f"{w[n]['trained'].get(f'spearman_{k}', float('nan')):.3f}" for k in ("embedding", "context"))
               if n in w else "–" for n in WORD_SETS]
        out.append(f"| {label} | {p['pretrain_s']:.0f} | {p['mlm_loss']:.3f} | " + " | ".join(acc)
                   + f" | {b.get('pairs', '–')} | " + " | ".join(rho) + " |")
    out += ["", "| recipe | adapt | task | labels/class | " + " | ".join(SYSTEMS) + " | fine-tune s |",
            "|---|---|---|---|" + "---|" * (len(SYSTEMS) + 1)]
    keys = dict.fromkeys((r["recipe"], r["adapt"], r["task"], r["labels"]) for r in rows if r["recipe"] != "controls")
    for recipe, adapt, task, labels in keys:
        cells = []
        for s in SYSTEMS:
            src = recipe if s == "pretrained" else "controls"
            match = [r for r in rows if r["system"] == s and r["task"] == task and r["labels"] == labels
                     and (r["recipe"], r["adapt"]) == ((recipe, adapt) if s == "pretrained" else (src, 0))
                     and r.get("arch") == pre[recipe]["arch"]]
            cells.append(summary(match))
        t = sum(r["train_s"] for r in rows if (r["recipe"], r["adapt"], r["task"], r["labels"]) == (recipe, adapt, task, labels))
        out.append(f"| {recipe} | {adapt} | {task} | {labels or 'all'} | " + " | ".join(cells) + f" | {t:.0f} |")
    out += ["", "Accuracy on the test split, mean ± std over the fine-tuning seeds (each seed draws its own subset "
            "of labels); random init, bag-of-words and majority are trained once per architecture. BLiMP: share of "
            "the minimal pairs (all words in the vocabulary) whose acceptable sentence scores strictly higher."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="book:50,budget:2273")
    ap.add_argument("--adapt", default="0", help="task-adaptive MLM steps before fine-tuning, a list (0 = none)")
    ap.add_argument("--label-counts", default="10,30,100,0", help="labels per class (0 = all)")
    ap.add_argument("--tasks", default="bbc")
    ap.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    ap.add_argument("--pretrain-seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="finetune.KEY=VALUE for every system")
    ap.add_argument("--no-controls", action="store_true", help="the pretrained column only (controls run before)")
    ap.add_argument("--blimp-max-pairs", type=int, default=0, help="per paradigm (0 = all); -1: no BLiMP")
    ap.add_argument("--params", type=Path, default=ROOT / layout.PARAMS)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=ROOT / layout.PAIRS)
    ap.add_argument("--models", type=Path, default=None,
                    help="where pretrained models are kept (default ~/.cache/minibert/bench-models; --smoke: none)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="synthetic pairs, a tiny model, a generated task")
    a = ap.parse_args(argv)
    recipes, seeds = parse_recipes(a.recipes), tuple(int_list(a.seeds, "--seeds"))
    adapts, counts = int_list(a.adapt, "--adapt"), tuple(int_list(a.label_counts, "--label-counts"))
    raw = yaml.safe_load(a.params.read_text()) or {}
    configs = {f"{n}:{s}": recipe_config(n, raw, a.smoke) for n, s in recipes}  # an unknown preset fails first
    over = {**finetune_overrides(a.set), "seeds": seeds, "label_counts": counts}
    tune_cpu_malloc()
    tmp = tempfile.TemporaryDirectory(prefix="minibert-bench-transfer-")
    if a.smoke:
        train, valid, V = smoke_data()
        vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(V - len(SPECIALS))))
        tasks = {"smoke": dataclasses.replace(smoke_task(Path(tmp.name), vocab), **over)}
        words, pairs_df, counts_v = (), None, None
    else:
        splits, V, _ = load_splits(("train", "valid"), a.data, a.pairs)
        train, valid = splits["train"], splits["valid"]
        vocab = Vocab.load(a.pairs.parent / layout.TOKENS.name / layout.VOCAB.name)
        tasks = {t: FinetuneConfig(**{**yaml.safe_load(a.params.read_text()).get("finetune", {}), "task": t, **over})
                 for t in a.tasks.split(",")}
        words = WORD_SETS
        pairs_df = None if a.blimp_max_pairs < 0 else blimp.read_blimp(locate("blimp"))
        if pairs_df is not None and a.blimp_max_pairs:
            pairs_df = pairs_df.groupby("UID", sort=False).head(a.blimp_max_pairs).reset_index(drop=True)
        counts_v = blimp.word_counts(a.pairs.parent / layout.TOKENS.name / "train.safetensors", vocab) \
            if pairs_df is not None else None
    data = {t: load_task(c) for t, c in tasks.items()}  # a missing task file fails before any training
    kind = cpu_kind(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    out_dir = a.out or ROOT / "bench/results" / f"{datetime.date.today()}-transfer-{commit()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, pre, archs_done = [], {}, set()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for label, cfg in configs.items():
        steps = int(label.rsplit(":", 1)[1])
        model, figures = pretrained(cfg, train, valid, V, a.pretrain_seed, steps, a.models or (None if a.smoke else STORE))
        untrained = build_model(cfg.model, V, seed=a.pretrain_seed).to(DEVICE)
        arch = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
        p = {**figures, "arch": arch, "words": word_similarity(model, untrained, vocab, words)}
        if pairs_df is not None:
            t0 = time.perf_counter()
            p["blimp"], _ = blimp.score({"pretrained": model, "untrained": untrained}, counts_v, pairs_df, vocab,
                                        cfg.model.max_len)
            p["blimp_s"] = round(time.perf_counter() - t0, 1)
        pre[label] = p
        log(json.dumps({"recipe": label, **{k: v for k, v in p.items() if k not in ("arch", "words")}})[:400])
        for task, fcfg in tasks.items():
            train_df, test_df, origin = data[task]
            jobs = [(adapt, ("pretrained",)) for adapt in adapts]
            if (arch, task) not in archs_done and not a.no_controls:  # they do not depend on the pretraining
                jobs.append((0, CONTROLS))
                archs_done.add((arch, task))
            for adapt, systems in jobs:
                result = run(dataclasses.replace(fcfg, adapt_steps=adapt), lambda: copy.deepcopy(model), vocab,
                             train_df, test_df, origin, log=log, systems=systems)
                for r in result.per_seed.to_dict("records"):
                    if r["system"] == "majority" and systems != CONTROLS:
                        continue
                    rows.append({"recipe": label if systems != CONTROLS else "controls", "adapt": adapt,
                                 "arch": arch, "task": task, "data": origin, "test_examples": len(test_df), **r})
    tmp.cleanup()
    header = (f"Transfer ({datetime.date.today()}): {kind}, {torch.get_num_threads()} threads; pretrain seed "
              f"{a.pretrain_seed}, fine-tuning seeds {list(seeds)}; fine-tuning: "
              + (", ".join(f"{k}={v}" for k, v in finetune_overrides(a.set).items()) or a.params.name) + "; "
              + ", ".join(f"{t}: {len(d[0])} train / {len(d[1])} test ({d[2]})" for t, d in data.items())
              + ("; smoke: synthetic pairs, tiny model, generated task" if a.smoke else ""))
    with open(out_dir / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.writelines(json.dumps({"recipe": k, "pretrained": {kk: vv for kk, vv in v.items() if kk != "arch"}}) + "\n"
                     for k, v in pre.items())
    (out_dir / "table.md").write_text(table(rows, pre, header))
    print(table(rows, pre, header))
    return out_dir


if __name__ == "__main__":
    main()
