"""What a run says it is: its name, a one-line description, the hyperparameters worth comparing,
and its tags: the source tags MLflow's own `mlflow.start_run` would set (runs here are made with
`MlflowClient.create_run`, which sets none of them), whether the checkout is dirty, the DVC
experiment. The one home of a run's tags and of reading `DVC_EXP_NAME`.

Name: the DVC experiment name under `dvc exp run` (DVC sets `DVC_EXP_NAME`), else what differs
from the committed `params.yaml` (`lr=0.002 steps=20`), else `baseline`.
"""
from __future__ import annotations

import functools
import getpass
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from minibert.config import Config, flatten

SECTIONS = ("vocab", "pairs", "model", "train", "eval")  # hyperparameters: what changes the numbers
NOT_COMPARED = {"train.rdzv_endpoint", "train.rdzv_id", "train.max_restarts"}  # plumbing of a multi-node launch
SHORT = {"train.max_steps": "steps", "train.batch_size": "batch", "model.num_layers": "layers",
         "train.seed": "seed"}  # the headers `minibert runs` uses
MAX_NAME = 120  # characters; MLflow's limit is 250, the runs table shows far fewer
DIFF_TAG, NOTE_TAG = "params_diff", "mlflow.note.content"


def is_hyperparam(key: str) -> bool:
    return (key == "preset" or key.split(".", 1)[0] in SECTIONS) and key not in NOT_COMPARED


def hyperparams(flat: dict[str, Any]) -> dict[str, Any]:
    """The entries of a flattened config worth comparing: no URLs, probe texts, tracking or None."""
    return {k: v for k, v in flat.items() if is_hyperparam(k) and v is not None}


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def committed_params(params_file: Path, rev: str | None = None) -> dict | None:
    """`params_file` as committed at `rev` (DVC's experiment baseline, else HEAD); None outside git."""
    folder = params_file.resolve().parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    rel = params_file.resolve().relative_to(Path(top).resolve()).as_posix()
    rev = rev or os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    text = _git(folder, "show", f"{rev}:{rel}")
    if text is None:
        return None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return None


def params_diff(reference: dict, current: dict) -> dict[str, Any]:
    """Hyperparameter leaves of `current` that differ from `reference` (both raw YAML, before
    presets, so `-S preset=pre_ln` reads as that, not as the five keys it sets); in file order.
    A key that `current` drops shows as `None` (it takes its default)."""
    ref, cur = flatten(reference or {}), flatten(current or {})
    diff = {k: v for k, v in cur.items() if is_hyperparam(k) and (k not in ref or ref[k] != v)}
    diff.update({k: None for k in ref if is_hyperparam(k) and k not in cur})
    return diff


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "default" if v is None else str(v)


@functools.cache
def _leaves() -> tuple[str, ...]:
    return tuple(k.rsplit(".", 1)[-1] for k in flatten(Config()) if is_hyperparam(k))


def _short_key(key: str) -> str:
    """`lr` for train.lr; the dotted key when another section has the same last part (pairs.seed)."""
    leaf = key.rsplit(".", 1)[-1]
    return SHORT.get(key) or (leaf if _leaves().count(leaf) == 1 else key)


def short_name(diff: dict[str, Any]) -> str:
    """`lr=0.002 steps=20`, in file order; `baseline` when nothing differs."""
    if not diff:
        return "baseline"
    name = " ".join(f"{_short_key(k)}={_value(v)}" for k, v in diff.items())
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1] + "…"


def levers(params: dict[str, Any]) -> str:
    """The quality levers set away from the book's values, as `; tied decoder, no decoder bias, …` ('' if none)."""
    p = params.get
    out = []
    if p("model.tie_decoder"):
        out.append("tied decoder")
    if p("model.decoder_bias") is False:
        out.append("no decoder bias")
    if p("train.grad_clip"):
        out.append(f"clip {p('train.grad_clip')}")
    if p("train.masking") == "dynamic":
        out.append(f"dynamic masks {p('train.mask_rate')}")
    return "; " + ", ".join(out) if out else ""


def budget_clause(params: dict[str, Any]) -> str:
    """`; budget 15 min = 1200 steps` when `train.budget_minutes` is set, else ''."""
    minutes = params.get("train.budget_minutes")
    return f"; budget {minutes:g} min = {params.get('train.max_steps')} steps" if minutes else ""


def budget_name(name: str, params: dict[str, Any], wall_s: float | None = None) -> str:
    """A budget run's name carries recipe, budget and (once known) wall time:
    `lumpy-tush [budget: 1200 steps, 15 min budget, 871 s]`; other runs keep `name`."""
    minutes = params.get("train.budget_minutes")
    if not minutes:
        return name
    wall = f", {wall_s:.0f} s" if wall_s is not None else ""
    return (f"{name} [{params.get('preset', 'book')}: {params.get('train.max_steps')} steps, "
            f"{minutes:g} min budget{wall}]")


def description(params: dict[str, Any], diff: dict[str, Any] | None) -> str:
    """One line: model and recipe from the effective (flattened) params, then what differs."""
    p = params.get
    warmup = p("train.warmup_steps") or (f"{p('train.warmup_share'):g} of steps" if p("train.warmup_share") else 0)
    warm = f", warmup {warmup}" if warmup else ""
    opt = "AdamW" if p("train.optimizer") == "adamw" else "Adam"
    if p("train.beta2", 0.999) != 0.999 or p("train.weight_decay"):
        opt += f" (β2 {p('train.beta2')}, decay {p('train.weight_decay')})"
    changed = "as committed" if diff == {} else f"changed: {short_name(diff)}" if diff else "no committed params.yaml"
    return (f"BERT {p('model.num_layers')} layers × {p('model.hidden')} hidden, {p('model.heads')} heads, "
            f"FFN {p('model.ffn_hidden')}, {p('model.norm')}-LN, dropout {p('model.dropout')}; "
            f"{opt} lr {p('train.lr')} {p('train.schedule')}{warm}, {p('train.max_steps')} steps × "
            f"{p('train.batch_size')} pairs, {p('train.precision')}, seed {p('train.seed')}{levers(params)}"
            f"{budget_clause(params)}; preset {p('preset', 'book')}; {changed}")


def _source_name(root: Path) -> str:
    """sys.argv[0] as MLflow records it, relative to the project when inside it (the same script
    reads `stages/pretrain.py` in the workspace and in `dvc exp run --temp`'s copy)."""
    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    if main is None:
        return "<console>"
    try:
        return Path(main).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return main


def dvc_experiment() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME), if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_tags(root: Path) -> dict[str, str]:
    """Every tag a new run gets from where it runs: the tags `mlflow.start_run` sets from its default
    and git context providers (user, source name and type, git commit, branch (none when detached),
    remote URL without credentials), whether tracked files differ from the commit, the DVC experiment."""
    tags = {"mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or _user(),
            "mlflow.source.name": _source_name(root), "mlflow.source.type": "LOCAL"}
    for key, args in (("mlflow.source.git.commit", ("rev-parse", "HEAD")),
                      ("mlflow.source.git.branch", ("symbolic-ref", "--short", "-q", "HEAD")),
                      ("mlflow.source.git.repoURL", ("remote", "get-url", "origin"))):
        if value := _git(root, *args):
            tags[key] = re.sub(r"//[^/@]*@", "//", value)  # no tokens from https://user:token@host
    if "mlflow.source.git.commit" in tags:
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git_dirty"] = str(bool(status)).lower()
    if exp := dvc_experiment():
        tags["dvc_exp_name"] = exp
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):
        return "unknown"


def describe_run(params: dict[str, Any], params_file: Path | None,
                 wall_s: float | None = None) -> tuple[str, dict[str, str]]:
    """(run name, description tags) of a new run from its flattened params and the params file it read;
    `wall_s` (known at the end) joins a budget run's name."""
    current = yaml.safe_load(params_file.read_text()) if params_file and params_file.is_file() else None
    reference = committed_params(params_file) if current is not None else None
    diff = params_diff(reference, current) if reference is not None else None
    name = dvc_experiment() or (short_name(diff) if diff is not None else "uncommitted")
    name = budget_name(name, params, wall_s)
    tags = {NOTE_TAG: description(params, diff)}
    if diff is not None:
        tags[DIFF_TAG] = short_name(diff)
    return name, tags
