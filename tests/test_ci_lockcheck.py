"""The committed dvc.lock is current: data stages rerun hash-exactly, other stages by dep/param hashes."""
import json

import pytest
import yaml

from ci.lockcheck import FIX, check, data_mismatches, dvc, lock_stages, message, outs_by_storage, status_problems
from tests.git_project import ROOT, project_copy

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A copy of the working tree, the data stages rerun there, and what the check found."""
    import os
    if not os.environ.get("MINIBERT_DATA"):
        pytest.skip("MINIBERT_DATA unset: the data stages need the real WikiText-2")
    root = project_copy(tmp_path_factory.mktemp("lock"))
    committed = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None
    return root, committed, check(root)


@slow
def test_committed_dvc_lock_is_current(checked):
    _, _, problems = checked
    assert not problems, message(problems)


@slow
def test_a_code_or_param_change_without_repro_is_caught(checked):
    """The check is able to fail: edit a stage's code and a param, leave dvc.lock alone."""
    root, _, _ = checked
    script, params = root / "stages/evaluate.py", root / "params.yaml"
    saved = script.read_text(), params.read_text()
    try:
        script.write_text(saved[0] + "\n# a change that was never reproduced\n")
        p = yaml.safe_load(saved[1])
        p["train"]["lr"] = p["train"]["lr"] * 2
        params.write_text(yaml.safe_dump(p, sort_keys=False))
        problems = status_problems(json.loads(dvc(root, "status", "--json")),
                                   yaml.safe_load((root / "dvc.yaml").read_text()))
    finally:
        script.write_text(saved[0])
        params.write_text(saved[1])
    text = message(problems)
    assert any(p.startswith("evaluate:") and "stages/evaluate.py" in p for p in problems), text
    assert any(p.startswith("pretrain:") and "train.lr" in p for p in problems), text
    assert not any(p.startswith("probe:") for p in problems), text  # probe reads neither
    assert "make repro" in text and "commit dvc.lock" in text and FIX in text


@slow
def test_an_uncommitted_metric_is_caught(checked):
    root, _, _ = checked
    metric = root / "metrics/eval.json"
    saved = metric.read_bytes()
    try:
        metric.unlink()
        problems = status_problems(json.loads(dvc(root, "status", "--json")),
                                   yaml.safe_load((root / "dvc.yaml").read_text()))
    finally:
        metric.write_bytes(saved)
    assert any(p.startswith("evaluate:") and "metrics/eval.json deleted" in p for p in problems), problems


@slow
def test_a_data_output_hash_change_is_caught(checked):
    """Data stages compare whole lock entries: a different output hash (new tokenizer code, say)."""
    root, committed, _ = checked
    fresh = lock_stages((root / "dvc.lock").read_text())
    old = lock_stages(committed)
    assert data_mismatches(old, fresh) == []
    old["pairs"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    del old["download"]
    found = data_mismatches(old, fresh)
    assert found == ["download: not in the committed dvc.lock", "pairs: outputs (hashes) differ from the committed dvc.lock"]


def test_the_baseline_commits_exactly_the_cache_false_outputs():
    """git tracks the `cache: false` outputs and nothing under data/ or models/ (the DVC cache's)."""
    import subprocess
    cached, tracked = outs_by_storage(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert {"metrics/train.json", "metrics/eval.json", "plots/train_loss.csv"} <= tracked
    assert {"models/bert.safetensors", "data/pairs"} <= cached
    in_git = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "dvc.lock" in in_git and tracked <= in_git, sorted(tracked - in_git)
    assert not [f for f in in_git if f.startswith(tuple(cached))]


def test_every_stage_can_be_served_by_the_run_cache():
    """DVC does not save a stage with an uncached plain `outs` entry to its run cache (dvc/stage/__init__.py,
    `no_cache_outs`), so CI would recompute it every time: git-tracked files belong under metrics/plots.
    The real rerun is checked in tests/test_ci_pipeline.py (a second CI run runs no stage)."""
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            assert (opts or {}).get("cache") is not False, (
                f"dvc.yaml: {name}: outs: {path} has cache: false; move it under `plots:` or `metrics:` "
                f"(or cache it), else the stage never reaches the run cache")
