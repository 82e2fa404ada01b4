"""The finetune stage end to end: a tiny pretrained model, the user's own labelled files, every system and
seed, the metrics/plots/MLflow outputs; bad input as one line with nothing written."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_project import pretrain_run, stage

from minibert.config import ModelConfig
from minibert.data.vocab import SPECIALS, Vocab
from minibert.model.bert import build_model, save_pretrained
from minibert.tracking.store import tracking_uri

TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
TEST_COUNTS = {"a": 7, "b": 5, "c": 1}


def _rows(counts: dict[str, int], rng) -> list[str]:
    """class a writes words w0-w9, b w20-w29, c w30-w36; some rows are pairs (text_b)."""
    base = {"a": 0, "b": 20, "c": 30}
    out = []
    for label, n in counts.items():
        for _ in range(n):
            words = lambda: " ".join(f"w{base[label] + rng.integers(0, 7)}" for _ in range(rng.integers(1, 6)))  # noqa: E731
            out.append(f"{words()}\t{words() if rng.random() < 0.3 else ''}\t{label}")
    rng.shuffle(out)
    return out


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(37)))
    vocab.save(tmp_path / "data/tokens/vocab.txt")
    save_pretrained(build_model(TINY, len(vocab), seed=0), tmp_path / "models", {"vocab_sha256": vocab.sha256})
    rng = np.random.default_rng(13)
    (tmp_path / "mine.tsv").write_text("text\ttext_b\tlabel\n" + "\n".join(_rows({"a": 31, "b": 19, "c": 11}, rng)) + "\n")
    (tmp_path / "held.tsv").write_text("text\ttext_b\tlabel\n" + "\n".join(_rows(TEST_COUNTS, rng)) + "\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "pairs": {"max_len": 13}, "model": {"max_len": 13},
        "finetune": {"task": "file", "train_file": "mine.tsv", "test_file": "held.tsv", "max_len": 13, "epochs": 2,
                     "batch_size": 13, "seeds": [0, 1], "lr": 0.003, "min_epoch_examples": 0},
        "tracking": {"enabled": True, "experiment": "ft-13"}}))
    return tmp_path


def test_stage_outputs_controls_and_mlflow(project):
    from mlflow import MlflowClient

    run_id = pretrain_run(project, "ft-13")
    stage(project, "finetune", timeout=600)  # fails the test with the stage's output on a non-zero exit
    m = json.loads((project / "metrics/finetune.json").read_text())
    # the dev split: max(1, round(0.1 * n)) of each class's 31, 19, 11 training rows = 3 + 2 + 1, out of training
    assert m["classes"] == ["a", "b", "c"] and (m["train_examples"], m["dev_examples"], m["test_examples"]) == (55, 6, 13)
    # the majority class of the training file is `a`: it is right on the test file's `a` rows only
    major = m["systems"]["majority"]
    assert major["accuracy"] == pytest.approx(TEST_COUNTS["a"] / 13)
    assert major["macro_f1"] == pytest.approx((2 * 7 / (13 + 7)) / 3)  # F1(a) = 2TP / (predicted + true); b, c: 0
    per_seed = pd.read_csv(project / "finetune/per_seed.csv")
    assert sorted(map(tuple, per_seed[["system", "seed"]].values.tolist())) == sorted(
        [(s, k) for s in ("pretrained", "random_init", "bag_of_words", "majority") for k in (0, 1)])  # majority: per run
    for system in ("pretrained", "random_init", "bag_of_words"):
        accs = per_seed[per_seed.system == system].accuracy.tolist()
        assert m["systems"][system]["accuracy"] == pytest.approx(statistics.mean(accs), abs=1e-6)
        assert m["systems"][system]["accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-6)
    curves = pd.read_csv(project / "plots/finetune_curves.csv")
    assert len(curves) == 3 * 2 * 2 and sorted(set(curves.epoch)) == [1, 2]
    pre, rnd = (curves[curves.system == s].train_loss.to_numpy() for s in ("pretrained", "random_init"))
    assert not np.allclose(pre, rnd)  # the pretrained weights, not a fresh initialisation, were fine-tuned
    assert (project / "plots/finetune_confusion.png").read_bytes()[:4] == b"\x89PNG"
    label_curve = pd.read_csv(project / "plots/finetune_labels.csv")
    assert sorted(label_curve.system) == sorted(["pretrained", "random_init", "bag_of_words", "majority"])
    assert (label_curve["labels"] == 0).all() and (label_curve.train_examples == 55).all()
    client = MlflowClient(tracking_uri(project))
    logged = client.get_run(run_id).data.metrics
    for system, row in m["systems"].items():
        assert logged[f"finetune_accuracy.{system}"] == pytest.approx(row["accuracy"])
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "finetune")}
    assert names == {"finetune.json", "per_seed.csv", "finetune_curves.csv", "finetune_labels.csv",
                     "finetune_confusion.png"}
    # same params, same bytes: a second run repeats every seed's figures
    first = (project / "finetune/per_seed.csv").read_bytes()
    assert stage(project, "finetune", timeout=600).returncode == 0
    assert (project / "finetune/per_seed.csv").read_bytes() == first


@pytest.mark.parametrize("held,needle", [
    ("text\tlabel\nw1 w2\td\n", "held.tsv:2: label 'd' is not among the training labels"),
    ("text\tlabel\nw1 w2\ta\nzebra\tb\n", "held.tsv:3: no word of the text is in the vocabulary"),
    ("text\tclass\nw1\ta\n", "held.tsv: no 'label' column"),
])
def test_bad_input_is_one_line_and_writes_nothing(project, held, needle):
    (project / "held.tsv").write_text(held)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage(project, "finetune", check=False, timeout=600)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not (project / "metrics/finetune.json").exists() and not (project / "finetune").exists()
