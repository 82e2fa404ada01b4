"""Publishing is not training: with real DVC in a git copy of the project, an edit to the serving code
or the probe table leaves the pretrain stage up to date, while the stages that use that code (and an
edit to the training loop, the control) are reported changed.

No stage is run: `dvc commit --force` records the stages' current deps and outs in dvc.lock (stand-in
bytes for the data and the model, which no status check reads beyond their hashes), so the test sees
only what `dvc status` makes of each edit.
"""
import json

import pytest
import yaml

from tests.git_project import project_copy, sh

STAGES = ("pretrain", "evaluate", "publish", "probe")


def paths(stage: dict) -> list[str]:
    """Every file a dvc.yaml stage names: deps, outs, metrics, plots."""
    entries = [e for key in ("deps", "outs", "metrics", "plots") for e in stage.get(key, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("isolation"))
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name in {p for s in STAGES for p in paths(dvc[s])}:
        path = root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"stand-in for {name}\n")
    sh(root, "dvc", "commit", "--force", "--quiet", *STAGES)
    return root


def changed(root, stage: str) -> dict:
    """`dvc status STAGE` (that stage alone, not its upstream) as JSON: {} when it is up to date."""
    return json.loads(sh(root, "dvc", "status", "--json", stage).stdout or "{}")


def edited(root, path: str):
    """Append a comment to `path` and return a function that puts the file back."""
    file = root / path
    before = file.read_text()
    file.write_text(before + "\n# an edit\n")
    return lambda: file.write_text(before)


def test_all_recorded_stages_start_up_to_date(project):
    assert {s: changed(project, s) for s in STAGES} == {s: {} for s in STAGES}


@pytest.mark.parametrize("path, users", [
    ("minibert/tracking/serving.py", ("publish",)),
    ("minibert/tracking/registry.py", ("publish",)),
    ("minibert/evaluation/probes.py", ("probe",)),
])
def test_publishing_and_probe_code_leave_pretrain_up_to_date(project, path, users):
    undo = edited(project, path)
    try:
        assert changed(project, "pretrain") == {}
        for stage in users:  # the edit is seen: the stage that imports the file is out of date
            assert path in json.dumps(changed(project, stage)), stage
    finally:
        undo()


def test_a_training_loop_edit_does_change_pretrain(project):
    """The control: the same check is able to see pretrain go out of date."""
    undo = edited(project, "minibert/training/loop.py")
    try:
        assert "minibert/training/loop.py" in json.dumps(changed(project, "pretrain"))
    finally:
        undo()
