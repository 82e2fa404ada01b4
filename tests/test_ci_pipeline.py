"""CI reruns against a real S3 server (moto_server on 127.0.0.1) with dvc-s3: push, pull, run cache,
experiments, and `python -m ci.pipeline` end to end with its markdown summary.

The pipeline is the project's real dvc.yaml over the real WikiText-2 data stages; only params.yaml
is shrunk (a tiny model, 3 steps, one thread) so that training costs seconds. Git's "origin" is a bare
repository; DVC's remote is a bucket on the local server, its endpoint in .dvc/config, its
credentials only in the environment of each command.
"""
import json
import os
import re
import sys

import pytest
import yaml

from tests.git_project import project_copy, sh, sha256
from tests.mlflow_server import free_port
from tests.s3_server import start_s3_server, stop_s3_server

pytestmark = pytest.mark.slow
TINY = {"model": {"num_layers": 1, "hidden": 12, "heads": 3, "ffn_hidden": 37, "dropout": 0.1},
        "train": {"batch_size": 13, "micro_batches": 1, "max_steps": 3, "threads": 1, "checkpoint_every": 3,
                  "log_every": 1, "device": "cpu", "precision": "fp32"},
        "finetune": {"epochs": 1, "seeds": [0], "max_train": 99, "max_test": 37, "max_len": 29, "batch_size": 13,
                     "label_counts": [0]},
        "blimp": {"max_pairs": 3},
        "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if not os.environ.get("MINIBERT_DATA") or not os.environ.get("MINIBERT_TASK_DATA"):
        pytest.skip("MINIBERT_DATA or MINIBERT_TASK_DATA unset: the pipeline needs WikiText-2 and the downstream data")
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    stop_s3_server(server.proc)


@pytest.fixture(scope="module")
def origin(s3, tmp_path_factory):
    """A bare git origin whose main holds the tiny-params project, an S3 remote, and the baseline
    (dvc.lock, metrics) that clone A reproduced and pushed (`dvc push --run-cache`)."""
    tmp = tmp_path_factory.mktemp("origin")
    seed = project_copy(tmp / "seed")
    params = yaml.safe_load((seed / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (seed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    url = s3.make_bucket("minibert") + "/dvc"
    sh(seed, "dvc", "remote", "add", "-d", "storage", url)
    sh(seed, "dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint)
    assert s3.secret not in (seed / ".dvc/config").read_text()
    sh(seed, "git", "commit", "-qam", "tiny params, S3 remote")
    bare = tmp / "origin.git"
    sh(tmp, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    sh(seed, "git", "push", "-q", str(bare), "main")

    a = tmp / "a"
    sh(tmp, "git", "clone", "-q", str(bare), str(a))
    out = sh(a, "dvc", "repro", env=s3.env()).stdout
    assert all(f"Running stage '{s}'" in out for s in ("download", "tokenize", "pairs", "pretrain"))
    sh(a, "dvc", "push", "--run-cache", env=s3.env())
    sh(a, sys.executable, "-m", "ci.runcache", env=s3.env())  # the entries' metrics/plots objects too
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "baseline: dvc.lock, metrics, plots")
    sh(a, "git", "push", "-q", "origin", "main")
    tracked = sh(a, "git", "ls-files").stdout.split()
    assert "dvc.lock" in tracked and "metrics/train.json" in tracked
    assert not [f for f in tracked if f.startswith(("data/", "models/"))]  # those live in the DVC cache
    return {"bare": bare, "a": a, "tmp": tmp, "model": sha256(a / "models/bert.safetensors")}


def clone(origin, name: str):
    dest = origin["tmp"] / name
    sh(origin["tmp"], "git", "clone", "-q", str(origin["bare"]), str(dest))
    return dest


def test_fresh_clone_pull_then_repro_runs_no_stage(origin, s3):
    b = clone(origin, "b")
    assert not (b / "models/bert.safetensors").exists()
    sh(b, "dvc", "pull", env=s3.env())
    out = sh(b, "dvc", "repro", env=s3.env()).stdout
    assert "Running stage" not in out, out
    assert sha256(b / "models/bert.safetensors") == origin["model"]
    assert "up to date" in sh(b, "dvc", "status").stdout


def test_experiment_from_a_is_restored_in_b_without_training(origin, s3):
    a = origin["a"]
    out = sh(a, "dvc", "exp", "run", "-S", "train.max_steps=4", "-n", "four", env=s3.env()).stdout
    assert "Running stage 'pretrain'" in out and "Running stage 'tokenize'" not in out
    model, metrics = sha256(a / "models/bert.safetensors"), (a / "metrics/train.json").read_text()
    assert model != origin["model"] and json.loads(metrics)["steps"] == 4
    sh(a, "dvc", "exp", "push", "--run-cache", "origin", "four", env=s3.env())
    sh(a, sys.executable, "-m", "ci.runcache", env=s3.env())

    b = clone(origin, "b-exp")  # by name: git refs from origin, outputs from the S3 remote
    sh(b, "dvc", "exp", "pull", "origin", "four", env=s3.env())
    sh(b, "dvc", "exp", "apply", "four")
    assert sha256(b / "models/bert.safetensors") == model
    assert (b / "metrics/train.json").read_text() == metrics

    c = clone(origin, "c-exp")  # by params: the same `exp run` in another clone is served by the run cache
    sh(c, "dvc", "pull", "--run-cache", env=s3.env())
    out = sh(c, "dvc", "exp", "run", "--pull", "-S", "train.max_steps=4", env=s3.env()).stdout
    assert "Running stage" not in out, out
    assert sha256(c / "models/bert.safetensors") == model
    assert (c / "metrics/train.json").read_text() == metrics


def ci(root, *args, env=None, timeout=600):
    return sh(root, sys.executable, "-m", "ci.pipeline", "--skip-install", "--skip-test", *args, check=False,
              env=env, timeout=timeout)


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2:]
    return rows


def test_ci_script_reruns_only_what_changed_and_summarises_the_diff(origin, s3):
    c = clone(origin, "ci")
    sh(c, "git", "checkout", "-qb", "feature")
    params = yaml.safe_load((c / "params.yaml").read_text())
    params["train"]["lr"] = 0.0037  # a param change pushed without `make repro`: CI computes it
    (c / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(c, "git", "commit", "-qam", "lr")
    sh(c, "git", "push", "-q", "origin", "feature")
    summary = c.parent / "summary.md"
    proc = ci(c, "--push", "--base", "origin/main", "--summary", str(summary), env=s3.env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("download", "tokenize", "pairs"):  # pulled from the remote, not recomputed
        assert f"Running stage '{stage}'" not in proc.stdout
    assert "Running stage 'pretrain'" in proc.stdout

    text = summary.read_text()
    rows = table_rows(text)
    old = json.loads(sh(c, "git", "show", "origin/main:metrics/train.json").stdout)
    new = json.loads((c / "metrics/train.json").read_text())
    assert old["mlm_loss"] != new["mlm_loss"]
    for key in ("mlm_loss", "nsp_loss"):
        o, n, d = (float(x) for x in rows[("metrics/train.json", key)][:3])
        assert o == pytest.approx(old[key], rel=1e-5) and n == pytest.approx(new[key], rel=1e-5)
        assert d == pytest.approx(new[key] - old[key], rel=1e-4, abs=1e-6)
    old_eval = json.loads(sh(c, "git", "show", "origin/main:metrics/eval.json").stdout)
    new_eval = json.loads((c / "metrics/eval.json").read_text())
    o, n, _ = (float(x) for x in rows[("metrics/eval.json", "mlm_loss")][:3])
    assert (o, n) == (pytest.approx(old_eval["mlm_loss"], rel=1e-5), pytest.approx(new_eval["mlm_loss"], rel=1e-5))
    assert rows[("params.yaml", "train.lr")][:2] == ["0.001", "0.0037"]
    assert text.index("metrics/train.json") < text.index("unchanged metrics")  # changed ones first
    assert "corpus.json" in text.split("unchanged metrics")[1]  # the corpus did not change: folded away

    # The same commit again in a fresh clone (a CI rerun): the run cache pushed above serves every stage.
    again = clone(origin, "ci-again")
    sh(again, "git", "checkout", "-q", "feature")
    proc = ci(again, "--base", "origin/main", "--summary", str(summary), env=s3.env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage" not in proc.stdout, proc.stdout
    assert (again / "metrics/train.json").read_text() == (c / "metrics/train.json").read_text()


@pytest.mark.parametrize("fault", ["secret", "endpoint"])
def test_bad_credentials_or_endpoint_give_one_line(origin, s3, fault):
    c = clone(origin, f"bad-{fault}")
    env = s3.env()
    if fault == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:  # the CI variables point at a port nothing listens on
        env.update(DVC_REMOTE_URL="s3://minibert/dvc", DVC_REMOTE_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    proc = ci(c, "--base", "origin/main", env=env, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ci: pull:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "AWS_SECRET_ACCESS_KEY" in lines[0]
    if fault == "endpoint":
        assert env["DVC_REMOTE_ENDPOINT"] in lines[0]
    assert "Running stage" not in proc.stdout  # it stops before computing anything
    assert not re.search(re.escape(s3.secret), proc.stdout + proc.stderr)
