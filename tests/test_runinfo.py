"""Runs that say what they are: names from the params diff or DVC, MLflow's standard tags, the
params worth comparing. Real git repos, a real sqlite MLflow store, a real `dvc exp run`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from mlflow import MlflowClient  # noqa: E402  (read back through MLflow's own client)

from minibert.config import TrackingConfig, flatten, load_config
from minibert.tracking.runinfo import params_diff, short_name
from minibert.tracking.runs import start_run
from minibert.tracking.store import tracking_uri

try:
    from tests.tiny_project import ROOT, make_workspace
except ImportError:  # plain `pytest` without the repo root on sys.path
    from tiny_project import ROOT, make_workspace

BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
# Written out by hand from params.yaml: the sections worth comparing, nothing else.
HYPERPARAMS = {
    "vocab.min_freq", "pairs.max_len", "pairs.mask_rate", "pairs.seed", "pairs.heldout_seed", "pairs.shard_tokens",
    "model.num_layers", "model.hidden", "model.heads", "model.ffn_hidden", "model.dropout", "model.max_len",
    "model.norm", "model.tie_decoder", "model.decoder_bias", "train.lr", "train.schedule", "train.warmup_steps",
    "train.warmup_share", "train.optimizer", "train.beta2", "train.weight_decay", "train.grad_clip", "train.masking",
    "train.mask_rate", "train.budget_minutes", "train.batch_size", "train.micro_batches",
    "train.max_steps", "train.seed", "train.device", "train.precision", "train.log_every",
    "train.checkpoint_every", "train.devices", "train.nodes", "train.threads", "train.compile",
    "train.eval_every", "eval.batch_size", "eval.subset_pairs", "eval.device", "preset"}


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})})
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def committed_repo(root: Path, params: Path = ROOT / "params.yaml") -> Path:
    """A git repo whose HEAD holds a copy of `params`."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(params, root / "params.yaml")
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "add", "params.yaml")
    sh(root, "git", "commit", "-qm", "params")
    return root


def edit(path: Path, **changes) -> None:
    """Set `section.key` values the way `dvc exp run -S section.key=value` does."""
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__") if "__" in dotted else (None, dotted)
        (raw[section] if section else raw)[key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    return committed_repo(tmp_path / "repo")


def open_run(root: Path, experiment: str = "names"):
    params = root / "params.yaml"
    with start_run(TrackingConfig(experiment=experiment), root, params=flatten(load_config(params)),
                   params_file=params) as t:
        run_id = t.run_id
    return MlflowClient(tracking_uri(root)).get_run(run_id)


def test_run_named_from_what_differs_from_the_commit(repo):
    edit(repo / "params.yaml", train__lr=0.002, train__max_steps=20)
    run = open_run(repo)
    assert run.info.run_name == "lr=0.002 steps=20"
    assert run.data.tags["mlflow.runName"] == "lr=0.002 steps=20" and run.data.tags["params_diff"] == "lr=0.002 steps=20"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("BERT 2 layers × 128 hidden, 2 heads, FFN 256, post-LN, dropout 0.2; Adam lr 0.002 constant")
    assert "20 steps × 512 pairs" in note and note.endswith("changed: lr=0.002 steps=20") and "\n" not in note


def test_budget_run_names_recipe_and_budget_and_describes_the_levers(repo):
    from minibert.tracking.runinfo import budget_name

    edit(repo / "params.yaml", preset="budget", train__max_steps=321, train__budget_minutes=15)
    run = open_run(repo)
    assert run.info.run_name.endswith(" [budget: 321 steps, 15 min budget]")
    note = run.data.tags["mlflow.note.content"]
    assert "AdamW (β2 0.98, decay 0.01) lr 0.005 linear, warmup 0.06 of steps, 321 steps × 128 pairs" in note
    assert "tied decoder, no decoder bias, clip 0.5, dynamic masks 0.2; budget 15 min = 321 steps; preset budget" in note
    params = {"preset": "budget", "train.max_steps": 321, "train.budget_minutes": 15.0}
    assert budget_name("x", params, 871.4) == "x [budget: 321 steps, 15 min budget, 871 s]"
    assert budget_name("x", {**params, "train.budget_minutes": 0.0}, 871.4) == "x"  # no budget stated


def test_unchanged_params_are_the_baseline(repo):
    run = open_run(repo)
    assert run.info.run_name == "baseline" and run.data.tags["params_diff"] == "baseline"
    assert run.data.tags["mlflow.note.content"].endswith("as committed")


def test_short_names_read_like_the_command_line():
    ref = yaml.safe_load((ROOT / "params.yaml").read_text())
    cur = yaml.safe_load((ROOT / "params.yaml").read_text())
    cur["preset"] = "pre_ln"  # one key, not the five keys the preset sets
    cur["pairs"]["seed"], cur["train"]["seed"] = 3, 7  # two sections share `seed`
    cur["eval"]["batch_size"], cur["train"]["compile"] = 99, True
    cur["data"]["mirrors"]["wikitext-2"]["zip_url"] = "http://127.0.0.1:9/x.zip"  # not a hyperparameter: not in the name
    assert params_diff(ref, cur) == {"pairs.seed": 3, "train.seed": 7, "train.compile": True,
                                     "eval.batch_size": 99, "preset": "pre_ln"}
    assert short_name(params_diff(ref, cur)) == "pairs.seed=3 seed=7 compile=true eval.batch_size=99 preset=pre_ln"
    assert short_name({}) == "baseline"


def test_a_key_deleted_from_params_yaml_names_the_run_by_its_default(repo):
    """Hand-worked: the committed file sets train.lr; the edited one drops it (it takes its default),
    so the run is `lr=default`, not `baseline`, and its note says what changed."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    ref = yaml.safe_load((repo / "params.yaml").read_text())
    del raw["train"]["lr"]
    assert params_diff(ref, raw) == {"train.lr": None}
    assert short_name(params_diff(ref, raw)) == "lr=default"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run = open_run(repo)
    assert run.info.run_name == "lr=default" and run.data.tags["params_diff"] == "lr=default"
    assert run.data.tags["mlflow.note.content"].endswith("changed: lr=default")


def test_params_are_hyperparameters_only_and_never_none(repo):
    run = open_run(repo)  # the project's own params.yaml: three URLs, probe sentences, `b` unset in one
    assert set(run.data.params) == HYPERPARAMS
    assert all(v not in ("None", "") and "http" not in v for v in run.data.params.values())
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.norm"] == "post"


def test_standard_tags_are_those_mlflow_start_run_sets(repo, monkeypatch):
    from mlflow.tracking.context.registry import _run_context_provider_registry, resolve_tags

    script = repo / "stages" / "pretrain.py"
    script.parent.mkdir()
    script.write_text("")
    sh(repo, "git", "checkout", "-q", "-b", "feature-13")
    sh(repo, "git", "remote", "add", "origin", "https://someone:s3cret@example.invalid/minibert.git")
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    # MLflow's git provider caches its answer for the life of the process, so an earlier test's
    # mlflow.start_run (another argv[0]) would decide what we expect here: start each cache empty.
    for provider in _run_context_provider_registry:
        if isinstance(getattr(provider, "_cache", None), dict):
            monkeypatch.setattr(provider, "_cache", {})
    expected = resolve_tags()  # what mlflow.start_run would add, from MLflow's own context providers
    run = open_run(repo)
    for key in ("mlflow.user", "mlflow.source.type", "mlflow.source.git.commit", "mlflow.source.git.branch",
                "mlflow.source.git.repoURL"):
        assert run.data.tags[key] == expected[key], key
    assert "s3cret" not in run.data.tags["mlflow.source.git.repoURL"]
    assert run.data.tags["mlflow.source.name"] == "stages/pretrain.py"  # MLflow's argv[0], project-relative
    assert (repo / run.data.tags["mlflow.source.name"]).resolve() == Path(expected["mlflow.source.name"]).resolve()
    assert run.info.user_id == expected["mlflow.user"]  # the UI's User column


DVC_YAML = """stages:
  pretrain:
    cmd: python -m stages.pretrain --params params.yaml
    deps: [data/pairs/train.safetensors, data/tokens/vocab.txt]
    params: [train, model]
    outs: [models]
    metrics:
      - metrics/train.json:
          cache: false
"""


def test_dvc_exp_run_names_the_run(tmp_path, monkeypatch):
    """DVC sets DVC_EXP_NAME (given with -n, or one it makes up) and DVC_EXP_BASELINE_REV."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_workspace(tmp_path / "exp", train={"lr": 0.001, "max_steps": 3, "checkpoint_every": 0}, tracking=True)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nplots/\ncheckpoints/\n")
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "dvc", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny project")
    env = {"PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    sh(root, "dvc", "exp", "run", "-n", "odd-exp-37", "-S", "train.lr=0.002", env=env)
    sh(root, "dvc", "exp", "run", "-S", "train.max_steps=5", env=env)  # DVC names this one
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], order_by=["attributes.start_time"])
    dvc_names = set(re.findall(r"\[(.+?)\]", sh(root, "dvc", "exp", "ls")))  # `0edb66d [empty-kiwi]`
    assert len(runs) == 2 and runs[0].info.run_name == "odd-exp-37"
    assert runs[1].info.run_name in dvc_names - {"odd-exp-37"}
    # Against the baseline commit; a workspace `exp run` keeps the previous -S, so the second has both.
    assert [r.data.tags["params_diff"] for r in runs] == ["lr=0.002", "lr=0.002 steps=5"]
    assert runs[0].data.params["train.lr"] == "0.002" and runs[1].data.params["train.max_steps"] == "5"
    assert "params.yaml" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}  # still an artifact
