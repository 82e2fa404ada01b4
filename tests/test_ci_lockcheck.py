"""The committed dvc.lock is current: data stages rerun hash-exactly, other stages by dep/param hashes."""
import json

import pytest
import yaml

from ci.lockcheck import FIX, check, data_mismatches, dvc, git_tracked_outs, lock_stages, message, status_problems
from tests.git_project import ROOT, project_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A copy of the working tree, the data stages rerun there, and what the check found."""
    import os
    if not os.environ.get("MINIBERT_DATA"):
        pytest.skip("MINIBERT_DATA unset: the data stages need the real WikiText-2")
    root = project_copy(tmp_path_factory.mktemp("lock"))
    committed = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None
    return root, committed, check(root)


def test_committed_dvc_lock_is_current(checked):
    _, _, problems = checked
    assert not problems, message(problems)


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
                                   git_tracked_outs(yaml.safe_load((root / "dvc.yaml").read_text())))
    finally:
        script.write_text(saved[0])
        params.write_text(saved[1])
    text = message(problems)
    assert any(p.startswith("evaluate:") and "stages/evaluate.py" in p for p in problems), text
    assert any(p.startswith("pretrain:") and "train.lr" in p for p in problems), text
    assert not any(p.startswith("probe:") for p in problems), text  # probe reads neither
    assert "make repro" in text and "commit dvc.lock" in text and FIX in text


def test_an_uncommitted_metric_is_caught(checked):
    root, _, _ = checked
    metric = root / "metrics/eval.json"
    saved = metric.read_bytes()
    try:
        metric.unlink()
        problems = status_problems(json.loads(dvc(root, "status", "--json")),
                                   git_tracked_outs(yaml.safe_load((root / "dvc.yaml").read_text())))
    finally:
        metric.write_bytes(saved)
    assert any(p.startswith("evaluate:") and "metrics/eval.json deleted" in p for p in problems), problems


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


def test_git_tracked_outs_are_exactly_the_cache_false_outputs():
    """The baseline commits these and nothing under data/ or models/ (they live in the DVC cache)."""
    tracked = git_tracked_outs(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert {"metrics/train.json", "metrics/eval.json", "plots/train_loss.csv"} <= tracked
    assert not any(p.startswith(("data/", "models/")) for p in tracked)
