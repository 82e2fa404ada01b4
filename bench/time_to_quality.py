"""Time to quality: held-out figures each recipe reaches in the same wall-clock budget, side by side.

    python -m bench.time_to_quality [--recipes book,pre_ln,budget,hf] [--seeds 0,1,2] [--budgets 1,3]
                                    [--T SECONDS] [--step-s NAME=SECONDS,...] [--points 6] [--out DIR] [--smoke]
    python -m bench.time_to_quality --recipes budget,budget+train.masking=static+train.mask_rate=0.15  # one lever

Budgets are multiples of T, the wall time of 500 steps of the book's recipe on this machine (measured
first unless `--T` is given). Each recipe (a preset of params.yaml, or `hf`: HF BertForPreTraining
with Trainer's defaults at the same size, bench/hf_bert.py) has its step time measured once
(`minibert.training.budget.measure`: warm-up, then timed steps of `fit` itself), and a budget of B seconds
becomes max_steps = B / step time: what `minibert budget` would tell a user, so the recipe's schedule
(warmup share, decay to 0 at the last step) is fitted to each budget. `--step-s` gives some recipes'
step times instead of measuring them (a long run's train s / steps is steadier than a 20 s window on
a shared VM). A constant-rate recipe (the
book) needs one run per seed, read at each budget's step count. All runs happen in this one process,
interleaved (seed, then budget, then recipe), so machine noise hits every recipe alike.

Each run is scored at `--points` evenly spaced steps and at its budget's step on the full valid split
with the evaluate stage's definitions (minibert.evaluation.heldout.evaluate; for hf the same sums), outside the
training clock. Writes to `--out` (default bench/results/<date>-time-to-quality-<commit>/): rows.jsonl (one line
per scored point: recipe, seed, budget, step, train_s, figures), table.md (recipe x budget: MLM loss,
MLM accuracy, NSP accuracy as mean ± std over seeds, steps, training seconds, CPU kind) and
curves.png (held-out MLM loss against training seconds, one curve per recipe: the mean over seeds of
the largest budget's runs; the smaller budgets' end points as markers). `--smoke` runs the whole
method in seconds on synthetic pairs and a tiny model (for the test), T = 10 book steps.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from bench import hf_bert
from bench.common import DEFAULT_DATA, DEVICE, load_splits
from bench.train import cpu_kind
from minibert import layout
from minibert.config import Config, ConfigError, config_from_dict
from minibert.evaluation.heldout import evaluate
from minibert.training.budget import measure
from minibert.training.heap import tune_cpu_malloc
from minibert.training.train import train_model

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("mlm_loss", "mlm_accuracy", "nsp_accuracy")
T_STEPS, SMOKE_T_STEPS = 500, 10
SMOKE_MODEL = {"num_layers": 1, "hidden": 12, "heads": 3, "ffn_hidden": 37, "max_len": 29}
GOALS = {1: 5.5, 3: 5.1}  # issue 27's held-out MLM loss goals at T and 3T


def recipe_config(name: str, raw: dict, smoke: bool) -> Config:
    """The preset's config (hf: the book's sizes); evaluation during `fit` is the bench's own.

    `NAME+section.key=value+...` is the preset with some levers set otherwise (values in YAML), for
    measuring one lever at a time: `budget+train.grad_clip=0`, `budget+model.tie_decoder=false`."""
    raw = copy.deepcopy(raw)
    name, *overrides = name.split("+")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, _, key = dotted.partition(".")
        if not (sep and section and key):
            raise SystemExit(f"bench.time_to_quality: recipe override {item!r}: write section.key=value")
        target = raw if name in ("book", "hf") else raw.setdefault("presets", {}).setdefault(name, {})
        target.setdefault(section, {})[key] = yaml.safe_load(value)
    if smoke:
        raw["pairs"] = {**raw.get("pairs", {}), "max_len": 29}
        raw["model"] = {**raw.get("model", {}), **SMOKE_MODEL}
        tiny = {"batch_size": 16, "micro_batches": 1, "threads": 1}
        raw["train"] = {**raw.get("train", {}), **tiny}
        if name not in ("book", "hf"):  # a preset's keys win over the sections: its batch too must be tiny
            preset_train = raw.setdefault("presets", {}).setdefault(name, {}).setdefault("train", {})
            preset_train.update({k: v for k, v in tiny.items() if k in preset_train})
    try:
        cfg = config_from_dict({**raw, "preset": "book" if name == "hf" else name}, str(layout.PARAMS))
    except ConfigError as e:
        raise SystemExit(f"bench.time_to_quality: recipe {name!r}: {e}") from None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=0, checkpoint_every=0,
                                                              log_every=1, device="cpu"))


def is_hf(recipe: str) -> bool:
    return recipe.split("+")[0] == "hf"


def step_seconds(name: str, cfg: Config, train: dict, vocab_size: int, smoke: bool) -> float:
    if is_hf(name):
        model = hf_bert.build(cfg.model, vocab_size, seed=0)
        return hf_bert.step_seconds(model, train, cfg.train.batch_size, timed=2 if smoke else 5)
    return measure(cfg, train, None, vocab_size, timed=2 if smoke else 10, min_seconds=0 if smoke else 20).step_s


def scored_steps(max_steps: int, points: int, extra: list[int]) -> list[int]:
    """`points` evenly spaced steps up to `max_steps` (the last included), plus `extra`, ascending."""
    spaced = {max(1, round(max_steps * (i + 1) / points)) for i in range(points)}
    return sorted(spaced | set(extra))


def run_minibert(cfg: Config, train: dict, valid: dict, vocab_size: int, seed: int, max_steps: int,
                 at: list[int]) -> list[dict]:
    tcfg = dataclasses.replace(cfg.train, seed=seed, max_steps=max_steps, eval_every=1)
    out: list[dict] = []

    def hooks(model, _opt) -> dict:
        def on_eval(step: int) -> dict | None:
            if step not in at:
                return None
            m = evaluate(model, valid, cfg.eval.batch_size, DEVICE, progress=False)
            return {f"valid_{k}": m[k] for k in FIGURES}
        return {"on_eval": on_eval, "on_log": on_log}

    def on_log(rows: list[dict]) -> None:
        out.extend({"step": r["step"], "train_s": r["valid_wall_s"], **{k: r[f"valid_{k}"] for k in FIGURES}}
                   for r in rows if "valid_mlm_loss" in r)

    train_model(cfg.model, tcfg, train, vocab_size, device=DEVICE, hooks=hooks)
    return out


def run_hf(cfg: Config, train: dict, valid: dict, vocab_size: int, seed: int, max_steps: int,
           at: list[int]) -> list[dict]:
    model = hf_bert.build(cfg.model, vocab_size, seed)
    return hf_bert.train(model, train, max_steps, cfg.train.batch_size, seed,
                         on_eval=lambda step: hf_bert.score(model, valid, cfg.eval.batch_size), eval_at=set(at))


def plan(recipes: dict[str, Config], steps: dict[str, dict[int, int]], seeds: list[int],
         budgets: list[int]) -> list[tuple[int, str, int]]:
    """(seed, recipe, budget multiple) runs in interleaved order; a constant-rate recipe runs only at
    the largest budget and is read at the others' step counts on the way."""
    runs = []
    for seed in seeds:
        for b in budgets:
            for name, cfg in recipes.items():
                if not is_hf(name) and cfg.train.schedule == "constant" and b != max(budgets):
                    continue
                runs.append((seed, name, b))
    return runs


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std per (recipe, budget) over the seeds' budget-step rows, in first-seen order."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["at_budget"]:
            cells.setdefault((r["recipe"], r["budget"]), []).append(r)
    out = []
    for (recipe, budget), group in cells.items():
        cell = {"recipe": recipe, "budget": budget, "seeds": len(group), "steps": group[0]["step"],
                "train_s": statistics.fmean(r["train_s"] for r in group)}
        for k in FIGURES:
            values = [r[k] for r in group]
            cell[k] = statistics.fmean(values)
            cell[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(cell)
    return sorted(out, key=lambda c: c["budget"])  # stable: recipes in the order given


def table(cells: list[dict], T: float, header: str) -> str:
    lines = [header, "", "| recipe | budget | steps | train s | MLM loss | MLM acc % | NSP acc % |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        pm = lambda k, s=1.0: f"{c[k] * s:.3f} ± {c[f'{k}_std'] * s:.3f}"  # noqa: E731
        lines.append(f"| {c['recipe']} | {c['budget']}T = {c['budget'] * T:.1f} s | {c['steps']} | "
                     f"{c['train_s']:.1f} | {pm('mlm_loss')} | {pm('mlm_accuracy', 100)} | {pm('nsp_accuracy', 100)} |")
    return "\n".join(lines) + "\n"


def draw(rows: list[dict], budgets: list[int], T: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    top = max(budgets)
    for i, recipe in enumerate(dict.fromkeys(r["recipe"] for r in rows)):
        color = f"C{i}"
        mine = [r for r in rows if r["recipe"] == recipe]
        curve: dict[int, list[dict]] = {}
        for r in mine:
            if r["budget"] == top:
                curve.setdefault(r["step"], []).append(r)
        steps = sorted(curve)
        ax.plot([statistics.fmean(r["train_s"] for r in curve[s]) for s in steps],
                [statistics.fmean(r["mlm_loss"] for r in curve[s]) for s in steps], "-o", ms=3, color=color,
                label=recipe)
        ends = [r for r in mine if r["at_budget"] and r["budget"] != top]
        if ends:
            ax.plot([r["train_s"] for r in ends], [r["mlm_loss"] for r in ends], "s", color=color, mfc="none")
    for b in budgets:
        ax.axvline(b * T, color="grey", lw=0.6, ls=":")
        if b in GOALS:
            ax.axhline(GOALS[b], color="grey", lw=0.6, ls="--")
    ax.set(xlabel="training seconds (evaluations left out)", ylabel="held-out MLM loss (nats)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smoke_data() -> tuple[dict, dict, int]:
    """Synthetic pairs (the tests' tiny workspace's kind): 99 paragraphs, vocabulary 99, max_len 29."""
    from minibert.config import PairsConfig
    from minibert.data.pairs import make_pairs
    from minibert.data.vocab import SPECIALS

    splits = {}
    for name, seed in (("train", 7), ("valid", 8)):
        rng = np.random.default_rng(seed)
        n_sent = rng.integers(2, 8, 99)
        lens = rng.integers(1, 14, n_sent.sum())
        split = {"ids": rng.integers(len(SPECIALS), 99, lens.sum()).astype(np.int32),
                 "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                 "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}
        splits[name] = make_pairs(split, PairsConfig(max_len=29), 99, rng)
    return splits["train"], splits["valid"], 99


def commit() -> str:
    """The checkout's short commit, for the results folder's name (bench/README.md's convention)."""
    import subprocess

    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "nogit"


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"bench.time_to_quality: {flag} {text!r} is not a comma-separated list of integers") from None
    return values


def step_s_given(text: str, names: list[str]) -> dict[str, float]:
    """`NAME=SECONDS,...` -> {NAME: SECONDS}; NAME is one of `names` (a recipe name may hold `=`)."""
    out: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = 0.0
        if name not in names or not seconds > 0:
            raise SystemExit(f"bench.time_to_quality: --step-s {item!r}: write RECIPE=SECONDS for a recipe of "
                             f"--recipes and a positive number of seconds")
        out[name] = seconds
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="book,pre_ln,budget,hf")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="1,3", help="multiples of T")
    ap.add_argument("--T", type=float, default=None, help="seconds [default: measured, 500 book steps]")
    ap.add_argument("--step-s", default="", metavar="NAME=SECONDS,...",
                    help="step seconds of some recipes, not measured: from a long run's train s / steps, steadier "
                         "than a 20 s window on a shared VM")
    ap.add_argument("--points", type=int, default=6, help="scored points per run besides the budget steps")
    ap.add_argument("--params", type=Path, default=ROOT / layout.PARAMS)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=Path, default=layout.PAIRS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="synthetic pairs, tiny model, T = 10 book steps")
    a = ap.parse_args(argv)
    seeds, budgets = int_list(a.seeds, "--seeds"), sorted(set(int_list(a.budgets, "--budgets")))
    if min(budgets) < 1 or a.points < 1:
        raise SystemExit("bench.time_to_quality: --budgets are positive multiples of T; --points >= 1")
    raw = yaml.safe_load(a.params.read_text()) or {}
    names = a.recipes.split(",")
    recipes = {n: recipe_config(n, raw, a.smoke) for n in names}  # an unknown preset fails here, before any work
    tune_cpu_malloc()
    if a.smoke:
        train, valid, vocab_size = smoke_data()
    else:
        splits, vocab_size, _ = load_splits(("train", "valid"), a.data, a.pairs)
        train, valid = splits["train"], splits["valid"]
    book = recipes.get("book") or recipe_config("book", raw, a.smoke)
    given = step_s_given(a.step_s, names)
    cost = {n: given.get(n) or step_seconds(n, cfg, train, vocab_size, a.smoke) for n, cfg in recipes.items()}
    T = a.T or (SMOKE_T_STEPS if a.smoke else T_STEPS) * (cost.get("book") or
                                                          step_seconds("book", book, train, vocab_size, a.smoke))
    steps = {n: {b: max(1, int(b * T / cost[n])) for b in budgets} for n in recipes}
    kind = cpu_kind(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    print(f"T = {T:.1f} s; step seconds {json.dumps({n: round(c, 4) for n, c in cost.items()})} "
          f"(given: {sorted(given) or 'none'}); "
          f"steps {json.dumps(steps)}; {kind}, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    out_dir = a.out or ROOT / "bench/results" / f"{datetime.date.today()}-time-to-quality-{commit()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed, name, b in plan(recipes, steps, seeds, budgets):
        cfg = recipes[name]
        # a constant-rate run (only at the largest budget) is also read at the smaller budgets' steps
        also = [x for x in budgets if x != b] if not is_hf(name) and cfg.train.schedule == "constant" else []
        at = scored_steps(steps[name][b], a.points, [steps[name][x] for x in also])
        runner = run_hf if is_hf(name) else run_minibert
        for r in runner(cfg, train, valid, vocab_size, seed, steps[name][b], at):
            new = [{"recipe": name, "seed": seed, "budget": b, "at_budget": r["step"] == steps[name][b], **r}]
            new += [{"recipe": name, "seed": seed, "budget": x, "at_budget": True, **r}
                    for x in also if steps[name][x] == r["step"]]
            for row in new:
                rows.append(row)
                print(json.dumps(row), flush=True)
    cells = summarize(rows)
    header = (f"Time to quality ({datetime.date.today()}): {kind}, {torch.get_num_threads()} threads, "
              f"T = {T:.1f} s ({'given' if a.T else f'{SMOKE_T_STEPS if a.smoke else T_STEPS} book steps'}"
              f"{', smoke: synthetic pairs, tiny model' if a.smoke else ''}), seeds {seeds}; full valid split")
    with open(out_dir / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (out_dir / "table.md").write_text(table(cells, T, header))
    draw(rows, budgets, T, out_dir / "curves.png", f"held-out MLM loss vs training time ({kind})")
    print(table(cells, T, header))
    return out_dir


if __name__ == "__main__":
    main()
