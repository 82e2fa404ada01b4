"""Integration: the real DVC pipeline on real WikiText-2 (MINIBERT_DATA) in a temp git repo."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file as load_np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def project_copy(dest: Path) -> Path:
    """The project's files as git sees them (tracked + untracked, not ignored), in a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    return dest


def digest(root: Path, *parts: str) -> dict[str, str]:
    out = {}
    for part in parts:
        for f in sorted((root / part).rglob("*")) if (root / part).is_dir() else [root / part]:
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data_env():
    for var, what in (("MINIBERT_DATA", "WikiText-2"), ("MINIBERT_TASK_DATA", "the probe and finetune stages' data")):
        if not os.environ.get(var):
            pytest.skip(f"{var} unset: the whole pipeline needs {what} offline")


DATA_OUTS = ("data/raw", "data/tokens", "data/pairs", "metrics/corpus.json", "metrics/corpus_stats.csv",
             "metrics/pairs.json")


def test_data_stages_are_reproducible_and_scoped(data_env, tmp_path):
    a, b = project_copy(tmp_path / "a"), project_copy(tmp_path / "b")
    sh(a, "dvc", "repro", "pairs")
    sh(b, "dvc", "repro", "pairs")
    corpus = json.loads((a / "metrics/corpus.json").read_text())
    pairs = json.loads((a / "metrics/pairs.json").read_text())
    assert corpus["vocab_size"] == 20256 and len((a / "data/tokens/vocab.txt").read_text().splitlines()) == 20256
    assert pairs["train_pairs"] > 40_000 and abs(pairs["train_nsp_positive_rate"] - 0.5) < 0.02
    da, db = digest(a, *DATA_OUTS), digest(b, *DATA_OUTS)
    assert len(da) >= 13 and da == db  # byte-identical outputs from two independent runs
    assert "up to date" in sh(a, "dvc", "status", "pairs").stdout
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["pairs"]["seed"] = 1
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(a, "dvc", "repro", "pairs").stdout
    assert "Running stage 'pairs'" in out and "Running stage 'tokenize'" not in out
    changed = digest(a, *DATA_OUTS)
    assert changed["data/pairs/train.safetensors"] != da["data/pairs/train.safetensors"]
    assert changed["data/pairs/valid.safetensors"] == da["data/pairs/valid.safetensors"]  # held-out seed is separate
    assert changed["data/tokens/vocab.txt"] == da["data/tokens/vocab.txt"]


@pytest.fixture(scope="module")
def full_run(data_env, tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("full"))
    out = sh(root, "dvc", "repro")
    return root, out


def plain_accuracy(root: Path, valid: dict) -> float:
    """Top-1 MLM accuracy over every real slot, counted with a plain padded loop (no `evaluate`)."""
    import torch

    from minibert.model.bert import load_pretrained

    model, _ = load_pretrained(root / "models")
    hits = slots = 0
    with torch.no_grad():
        for lo in range(0, len(valid["nsp_labels"]), 256):
            b = {k: torch.from_numpy(v[lo:lo + 256]) for k, v in valid.items()}
            logits, _ = model(b["token_ids"], b["segments"], b["valid_lens"], b["pred_positions"], b["mlm_weights"])
            labels = b["mlm_labels"][b["mlm_weights"] > 0].long()  # row-major: the order of the logits' rows
            hits += int((logits.argmax(-1) == labels).sum())
            slots += len(labels)
    return hits / slots


def test_full_pipeline_outputs(full_run):
    root, out = full_run
    for stage in ("download", "tokenize", "pairs", "pretrain", "evaluate", "publish", "probe", "finetune", "blimp"):
        assert f"Running stage '{stage}'" in out.stdout
    train = json.loads((root / "metrics/train.json").read_text())
    ev = json.loads((root / "metrics/eval.json").read_text())
    probe = json.loads((root / "metrics/probe.json").read_text())
    assert train["steps"] == 50 and train["pairs_per_sec"] > 0 and train["mlflow_run_id"]
    assert 5.0 < train["mlm_loss"] < 8.5 and 0.6 < train["nsp_loss"] < 0.8
    # eval.json against the valid pairs file and a plain re-count of the trained model's top-1 hits
    valid = load_np(str(root / "data/pairs/valid.safetensors"))
    assert ev["examples"] == len(valid["nsp_labels"]) > 4000
    assert ev["mlm_slots"] == int((valid["mlm_weights"] > 0).sum())
    assert ev["mlm_perplexity"] == pytest.approx(math.exp(ev["mlm_loss"]), rel=1e-5)  # both rounded to 1e-6
    # other batch shapes may flip a near-tie argmax: allow 2 slots of ~7k, plus the 1e-6 rounding
    assert ev["mlm_accuracy"] == pytest.approx(plain_accuracy(root, valid), abs=2 / ev["mlm_slots"] + 1e-6)
    assert ev["mlm_accuracy"] > 0.02  # 50 steps learn at least the most frequent words (chance: 1/20256)
    # the book's probe shapes: "<cls> a crane is flying <sep>" is 6 tokens, "<cls> a crane driver came
    # <sep> he just left <sep>" is 10, each encoded as one example of hidden size 128
    assert probe["probes"]["crane_flying"]["shape"] == [1, 6, 128]
    assert probe["probes"]["crane_driver"]["shape"] == [1, 10, 128]
    assert probe["probes"]["crane_flying"]["word_position"] == probe["probes"]["crane_driver"]["word_position"] == 2
    # "the" is ~7.5 % of the valid masked slots; NSP labels are fair coins
    assert 0.05 < ev["baseline_unigram_mlm_accuracy"] < 0.1 and 0.45 < ev["baseline_majority_nsp_accuracy"] < 0.55
    # the default finetune task: BBC News (2,225 articles, 5 topics; the largest is 511 = 23 %) with a 20 % test split
    ft = json.loads((root / "metrics/finetune.json").read_text())
    assert ft["task"] == "bbc" and ft["train_examples"] + ft["dev_examples"] + ft["test_examples"] == 2225
    assert ft["test_examples"] == 445 and 150 < ft["dev_examples"] < 200  # 10 % of each class of the 1,780
    assert set(ft["systems"]) == {"pretrained", "random_init", "bag_of_words", "majority"}
    assert 0.15 < ft["systems"]["majority"]["accuracy"] < 0.3 and ft["systems"]["bag_of_words"]["accuracy"] > 0.8
    assert all(ft["systems"][s]["seeds"] == 3 for s in ("pretrained", "random_init", "bag_of_words"))
    assert {n: w["trained"]["total"] for n, w in probe["word_similarity"].items()} == {"simlex999": 999, "wordsim353": 353}
    # BLiMP: 67 paradigms x 1,000 pairs, those in WikiText-2's vocabulary scored; the unigram control cannot
    # tell reordered words apart, so it stays well below 1; every system is a share of the scored pairs
    bl = json.loads((root / "metrics/blimp.json").read_text())
    assert bl["total_pairs"] == 67000 and 1000 < bl["pairs"] < 67000
    assert all(0.3 < bl[s]["accuracy"] < 0.9 for s in ("pretrained", "untrained", "unigram"))
    for f in ("models/bert.safetensors", "models/bert.json", "plots/train_loss.csv", "plots/train_loss.png",
              "plots/valid_curve.csv", "finetune/per_seed.csv", "plots/finetune_curves.csv", "plots/finetune_confusion.png",
              "probes/probe_table.parquet", "probes/probe_table.csv", "plots/probe_similarity.png",
              "plots/finetune_labels.csv", "blimp/paradigms.csv", "metrics/blimp.json"):
        assert (root / f).is_file(), f
    assert "up to date" in sh(root, "dvc", "status").stdout
    second = sh(root, "dvc", "repro")
    assert "Running stage" not in second.stdout  # a second repro does nothing


def test_full_pipeline_mlflow_run(full_run):
    import mlflow
    root, _ = full_run
    train = json.loads((root / "metrics/train.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(train["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_layers"] == "2" and run.data.params["train.batch_size"] == "512"
    assert len(client.get_metric_history(run.info.run_id, "mlm_loss")) == train["steps"]
    assert len(client.get_metric_history(run.info.run_id, "pairs_per_sec")) == train["steps"]
    assert "valid_mlm_loss" in run.data.metrics and "baseline_unigram_mlm_loss" in run.data.metrics
    # the subset curve every train.eval_every = 10 steps, then evaluate's full-set verdict at step 50
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid_mlm_loss")) == [10, 20, 30, 40,
                                                                                                   50, 50]
    assert run.data.tags.get("mlflow.source.git.commit") and run.data.tags.get("train_pairs_sha256")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_loss.csv", "train_loss.png", "params.yaml"} <= artifacts


def test_dvc_exp_run_shows_metrics_and_run_id(full_run):
    root, _ = full_run
    # one short fine-tuning: the finetune stage reruns after pretrain, and its default (3 seeds) costs ~90 s
    sh(root, "dvc", "exp", "run", "-S", "train.max_steps=20", "-S", "finetune.epochs=1", "-S", "finetune.seeds=[0]",
       "-S", "finetune.label_counts=[0]", "-S", "blimp.max_pairs=3", "-n", "short")
    shown = json.loads(sh(root, "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "short" in text and "mlflow_run_id" in text
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["steps"] == 20
    assert json.loads((root / "metrics/finetune.json").read_text())["systems"]["pretrained"]["seeds"] == 1
    import mlflow
    run = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(train["mlflow_run_id"])
    assert run.data.tags.get("dvc_exp_name") == "short"


def test_dvc_exp_run_temp_lands_in_the_repository_mlflow_db(full_run):
    """`dvc exp run --temp` runs in .dvc/tmp/exps/...; its MLflow run must land in the repo's mlflow.db."""
    import mlflow
    root, _ = full_run
    sh(root, "dvc", "exp", "run", "--temp", "-S", "train.max_steps=3", "-S", "finetune.epochs=1",
       "-S", "finetune.seeds=[0]", "-S", "finetune.label_counts=[0]", "-S", "blimp.max_pairs=3", "-n", "in-temp")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("minibert").experiment_id],
                              filter_string="tags.dvc_exp_name = 'in-temp'")
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "mlm_loss")) == 3


def test_own_text_corpus_through_dvc(tmp_path):
    """corpus: text end to end through real `dvc repro`: the lock records the normalised corpus's
    hash, the vocabulary is the text's lower-cased words, and a bad file stops the download stage
    with one error line."""
    import random

    root = project_copy(tmp_path / "p")
    rng = random.Random(13)
    words = ["Alpha", "beta", "Gamma", "delta", "eps", "Zeta", "eta", "theta"]
    para = lambda: " ".join(" ".join(rng.choices(words, k=rng.randint(3, 9))) + "." for _ in range(rng.randint(2, 4)))  # noqa: E731
    (root / "mytext").mkdir()
    (root / "mytext/a.txt").write_text("\n".join(para() for _ in range(70)) + "\n", encoding="utf-8")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"corpus": "text", "text_glob": "mytext"})
    params["vocab"]["min_freq"] = 1
    params["pairs"]["shard_tokens"] = 1000
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "dvc", "repro", "pairs")
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert [o["path"] for o in lock["download"]["outs"]] == ["data/raw/corpus"] and lock["download"]["outs"][0]["md5"]
    source = json.loads((root / "data/raw/corpus/source.json").read_text())
    assert source["files"][0]["sha256"] == hashlib.sha256((root / "mytext/a.txt").read_bytes()).hexdigest()
    vocab = (root / "data/tokens/vocab.txt").read_text().split("\n")[:-1]
    assert sorted(vocab[5:]) == sorted({w.lower() for w in words} | {"."})
    pairs = json.loads((root / "metrics/pairs.json").read_text())
    assert pairs["train_pairs"] > 50 and pairs["valid_pairs"] > 0 and pairs["test_pairs"] > 0
    (root / "mytext/b.txt").write_bytes(b"\xff\xfe l\x00a\x00t\x00i\x00n\x00")  # UTF-16: NUL bytes
    proc = sh(root, "dvc", "repro", "-f", "download", check=False)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: download:")]
    assert proc.returncode != 0 and errors == ["error: download: mytext/b.txt: a binary file (NUL byte on line 1); "
                                               "the text corpus takes UTF-8 .txt files, one paragraph per line"]
    assert not (root / "data/raw/corpus").exists()  # DVC cleared the old output; no partial new one


def test_heldout_curve_and_baselines_through_dvc(tmp_path):
    """The project's dvc.yaml on tiny synthetic pairs (no real data needed): pretrain writes the held-out
    curve DVC declares as a plot, `dvc plots show` overlays it on the train loss, evaluate adds the baselines."""
    from tiny_project import make_workspace

    root = project_copy(tmp_path / "p")
    params = yaml.safe_load((root / "params.yaml").read_text())
    tiny = yaml.safe_load((make_workspace(tmp_path / "tiny") / "params.yaml").read_text())
    make_workspace(root)  # data/tokens/vocab.txt, data/pairs/{train,valid}.safetensors
    for section, values in tiny.items():
        params[section] = {**params.get(section, {}), **values}
    params["train"].update(max_steps=9, eval_every=4, checkpoint_every=0)
    params["eval"].update(subset_pairs=37)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny")
    sh(root, "dvc", "repro", "--single-item", "pretrain")
    sh(root, "dvc", "repro", "--single-item", "evaluate")
    ev = json.loads((root / "metrics/eval.json").read_text())
    for k in ("baseline_unigram_mlm_loss", "baseline_unigram_mlm_accuracy", "baseline_majority_nsp_loss",
              "baseline_majority_nsp_accuracy"):
        assert 0 <= ev[k] < 10, k
    shown = json.loads(sh(root, "dvc", "plots", "show", "--json").stdout)["data"]
    points = shown["heldout_mlm_loss"][0]["content"]["data"]["values"]  # one chart, two files overlaid
    steps = {}
    for p in points:
        steps.setdefault(p["filename::field"], []).append(int(p["step"]))
    assert steps == {"train_loss.csv::mlm_loss": list(range(1, 10)), "valid_curve.csv::valid_mlm_loss": [4, 8, 9]}
    timed = shown["heldout_mlm_loss_vs_seconds"][0]["content"]["data"]["values"]  # the same points against seconds
    seconds = [float(p["valid_wall_s"]) for p in timed]
    assert len(seconds) == 3 and seconds == sorted(seconds) and seconds[0] > 0
