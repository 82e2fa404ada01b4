"""Each run's train/valid pairs and vocabulary are MLflow dataset inputs: content digest, DVC source."""
import hashlib
import json

import mlflow
import yaml
from test_pretrain import run_in_process
from tiny_project import make_workspace

from minibert.tracking.lineage import lock_md5


def inputs_of(root):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1
    return {d.dataset.name: d for d in runs[0].inputs.dataset_inputs}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_names_its_data_with_content_digests_and_dvc_sources(tmp_path, monkeypatch):
    root = make_workspace(tmp_path, train={"max_steps": 3, "eval_every": 3}, tracking=True)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "pairs": {"cmd": "x", "outs": [{"path": "data/pairs", "hash": "md5", "md5": "0123abcd.dir"}]},
        "tokenize": {"cmd": "y", "outs": [{"path": "data/tokens", "hash": "md5", "md5": "4567ef01.dir"}]}}}))
    run_in_process(root, monkeypatch)
    got = inputs_of(root)
    assert sorted(got) == ["train_pairs", "valid_pairs", "vocab"]
    train = got["train_pairs"]
    assert train.dataset.digest == sha256(root / "data/pairs/train.safetensors")[:32]
    assert got["valid_pairs"].dataset.digest == sha256(root / "data/pairs/valid.safetensors")[:32]
    vocab_tokens = (root / "data/tokens/vocab.txt").read_text().splitlines()
    assert got["vocab"].dataset.digest == hashlib.sha256(("\n".join(vocab_tokens) + "\n").encode()).hexdigest()[:32]
    src = json.loads(train.dataset.source)
    assert src["path"] == "data/pairs/train.safetensors" and src["dvc_lock_md5"] == "0123abcd.dir"
    assert json.loads(got["vocab"].dataset.source)["dvc_lock_md5"] == "4567ef01.dir"
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training"}


def test_runs_on_different_data_differ(tmp_path, monkeypatch):
    a = make_workspace(tmp_path / "a", train={"max_steps": 2}, tracking=True, seed=7)
    b = make_workspace(tmp_path / "b", train={"max_steps": 2}, tracking=True, seed=13)
    run_in_process(a, monkeypatch)
    run_in_process(b, monkeypatch)
    da, db = inputs_of(a)["train_pairs"].dataset, inputs_of(b)["train_pairs"].dataset
    assert da.name == db.name and da.digest != db.digest
    assert inputs_of(a)["vocab"].dataset.digest == inputs_of(b)["vocab"].dataset.digest  # same vocabulary


def test_lock_md5_finds_the_output_folder_holding_a_file(tmp_path):
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"s": {"outs": [
        {"path": "data/pairs", "md5": "aa.dir"}, {"path": "data/pairs2/x", "md5": "bb"}]}}}))
    assert lock_md5(tmp_path, "data/pairs/train.safetensors") == "aa.dir"
    assert lock_md5(tmp_path, "data/pairs2/x") == "bb"
    assert lock_md5(tmp_path, "data/pairs2/y") is None
    assert lock_md5(tmp_path / "nowhere", "data/pairs/x") is None
