"""params.yaml → typed config: defaults, and one clear error for every kind of bad value."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minibert.config import Config, ConfigError, config_from_dict, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_match_the_book():
    cfg = load_config(ROOT / "params.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden, cfg.model.heads, cfg.model.ffn_hidden) == (2, 128, 2, 256)
    assert (cfg.model.dropout, cfg.pairs.max_len, cfg.train.batch_size, cfg.train.lr) == (0.2, 64, 512, 1e-3)
    assert cfg.vocab.min_freq == 5 and cfg.pairs.max_preds == 10
    assert [p.name for p in cfg.probe.sentences] == ["crane_flying", "crane_driver"]
    assert cfg.tracking.registered_model == "minibert-encoder"
    assert config_from_dict({"tracking": {"registered_model": ""}}).tracking.registered_model == ""  # off


def test_missing_sections_take_defaults():
    assert config_from_dict({}) == Config()


@pytest.mark.parametrize("raw, key, fragment", [
    ({"pairs": {"max_len": "abc"}}, "pairs.max_len", "an integer"),
    ({"pairs": {"mask_rate": 1.5}}, "pairs.mask_rate", "(0, 1)"),
    ({"pairs": {"max_len": 3}}, "pairs.max_len", ">= 5"),
    ({"pairs": {"maxlen": 64}}, "pairs.maxlen", "known key"),
    ({"trian": {}}, "trian", "known key"),
    ({"model": {"heads": 3}}, "model.heads", "divisor of hidden"),
    ({"model": {"dropout": True}}, "model.dropout", "a number"),
    ({"model": {"max_len": 32}}, "model.max_len", "pairs.max_len"),
    ({"train": {"precision": "fp8"}}, "train.precision", "'bf16'"),
    ({"train": {"devices": 0}}, "train.devices", "auto or an integer"),
    ({"train": {"threads": "many"}}, "train.threads", "auto"),
    ({"train": {"threads": -1}}, "train.threads", "auto or an integer >= 0"),
    ({"train": {"eval_every": -1}}, "train.eval_every", "0: no held-out curve"),
    ({"eval": {"subset_pairs": 0}}, "eval.subset_pairs", ">= 1"),
    ({"eval": {"device": "gpu"}}, "eval.device", "auto, cpu, cuda or cuda:N"),
    ({"train": {"micro_batches": 0}}, "train.micro_batches", "auto or an integer >= 1"),
    ({"train": {"max_restarts": -1}}, "train.max_restarts", ">= 0"),
    # several processes on one named GPU: every rank would share it
    ({"train": {"device": "cuda:1", "devices": 2}}, "train.device", "local rank"),
    # nodes > 1 need a rendezvous every node can reach
    ({"train": {"nodes": 2}}, "train.rdzv_endpoint", "every node can reach"),
    ({"train": {"nodes": 3, "rdzv_endpoint": "127.0.0.2:29500"}}, "train.rdzv_endpoint", "loopback"),
    ({"train": {"nodes": 2, "rdzv_endpoint": "[::1]:29500"}}, "train.rdzv_endpoint", "loopback"),
    # the quality levers (issue 27)
    ({"model": {"tie_decoder": "yes"}}, "model.tie_decoder", "true/false"),
    ({"model": {"decoder_bias": 0}}, "model.decoder_bias", "true/false"),
    ({"train": {"warmup_share": 1.0}}, "train.warmup_share", "[0, 1)"),
    ({"train": {"warmup_share": 0.1, "warmup_steps": 7}}, "train.warmup_share", "give one of the two"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer", "'adamw'"),
    ({"train": {"beta2": 1.0}}, "train.beta2", "(0, 1)"),
    ({"train": {"optimizer": "adamw", "weight_decay": -0.01}}, "train.weight_decay", ">= 0"),
    ({"train": {"weight_decay": 0.01}}, "train.weight_decay", "needs optimizer: adamw"),
    ({"train": {"grad_clip": -1}}, "train.grad_clip", "0: no clipping"),
    ({"train": {"masking": "sometimes"}}, "train.masking", "'dynamic'"),
    ({"train": {"masking": "dynamic", "mask_rate": 0.0}}, "train.mask_rate", "(0, 1)"),
    ({"train": {"mask_rate": 0.3}}, "train.mask_rate", "set train.masking: dynamic"),
    ({"train": {"budget_minutes": -5}}, "train.budget_minutes", ">= 0"),
    ({"probe": {"sentences": [{"name": "x", "a": "a crane", "word": "bird"}]}}, "probe.sentences[0].word", "bird"),
    ({"probe": {"sentences": [{"name": "x"}]}}, "probe.sentences[0]", "missing"),
    ({"data": {"mirrors": {"wikitext-2": {"parquet_urls": {"train": "u"}}}}}, "data.mirrors.wikitext-2.parquet_urls",
     "train, valid, test"),
    ({"tracking": {"registered_model": "it's"}}, "tracking.registered_model", "empty (no registration)"),
    ({"tracking": {"registered_model": 3}}, "tracking.registered_model", "a string"),
])
def test_bad_values_name_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"params.yaml: {key} ") and fragment in msg


def test_multi_gpu_settings_that_can_work_are_accepted():
    assert config_from_dict({"train": {"nodes": 2, "rdzv_endpoint": "10.0.0.7:29500"}}).train.nodes == 2
    assert config_from_dict({"train": {"device": "cuda:1", "devices": 1}}).train.device == "cuda:1"
    assert config_from_dict({"train": {"device": "cuda", "devices": 4}}).train.devices == 4
    assert config_from_dict({"train": {"device": "cuda:1", "devices": "auto"}}).train.devices == "auto"


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flatten_gives_dotted_leaves():
    flat = flatten(Config())
    assert flat["model.num_layers"] == 2 and flat["probe.sentences.1.b"] == "he just left"
    assert all(not isinstance(v, (dict, list, tuple)) for v in flat.values())


def test_a_stage_prints_one_line_and_exits_nonzero(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"pairs": {"max_len": "abc"}}))
    out = tmp_path / "pairs"
    proc = subprocess.run([sys.executable, "-m", "stages.pairs", "--params", str(params), "--out", str(out),
                           "--tokens", str(tmp_path / "tokens"), "--metrics", str(tmp_path / "metrics")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pairs.max_len = 'abc'" in lines[0]
    assert not out.exists() and not (tmp_path / "metrics").exists()


def test_presets_override_sections_and_name_errors():
    raw = {"model": {"dropout": 0.2}, "train": {"lr": 1e-3},
           "preset": "fast", "presets": {"fast": {"model": {"dropout": 0.0, "norm": "pre"}, "train": {"lr": 3e-3}}}}
    cfg = config_from_dict(raw)
    assert (cfg.model.dropout, cfg.model.norm, cfg.train.lr, cfg.preset) == (0.0, "pre", 3e-3, "fast")
    assert config_from_dict({**raw, "preset": "book"}).model.dropout == 0.2
    with pytest.raises(ConfigError, match=r"preset = 'fastest' .*one of \['book', 'fast'\]"):
        config_from_dict({**raw, "preset": "fastest"})
    bad = {**raw, "presets": {"fast": {"train": {"lrr": 1}}}}
    with pytest.raises(ConfigError, match=r"train.lrr = 1 is invalid \(with preset 'fast'\)"):
        config_from_dict(bad)


def test_project_presets_are_valid():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ["book", *raw["presets"]]:
        config_from_dict({**raw, "preset": name}, "params.yaml")


@pytest.mark.parametrize("data,key,fragment", [
    ({"corpus": "wikitext-5"}, "data.corpus", "one of 'wikitext-2', 'wikitext-103', 'text'"),
    ({"corpus": "text"}, "data.text_glob", "a folder or glob of .txt files"),
    ({"workers": -1}, "data.workers", "an integer >= 0"),
    ({"mirrors": {"wikitext-103": {"parquet_urls": {"train": 5}}}}, "data.mirrors.wikitext-103.parquet_urls.train",
     "a string or tuple"),
])
def test_corpus_keys_are_checked(data, key, fragment):
    with pytest.raises(ConfigError, match=f"{key} = .*expected {fragment}"):
        config_from_dict({"data": data})


def test_project_params_choose_wikitext_2_and_one_pairs_shard_for_it():
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    assert cfg.data.corpus == "wikitext-2" and cfg.pairs.shard_tokens > 1_926_788  # WikiText-2's train tokens
    assert len(cfg.data.mirrors["wikitext-103"].parquet_urls["train"]) == 2
    with pytest.raises(ConfigError, match="pairs.shard_tokens = 999"):
        config_from_dict({"pairs": {"shard_tokens": 999}})


def test_budget_preset_sets_the_levers_and_leaves_the_budget_to_the_user():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = config_from_dict({**raw, "preset": "budget"})
    assert (cfg.model.norm, cfg.model.dropout, cfg.model.tie_decoder, cfg.model.decoder_bias) == ("pre", 0.0, True, False)
    assert (cfg.train.optimizer, cfg.train.beta2, cfg.train.weight_decay, cfg.train.masking) == ("adamw", 0.98, 0.01, "dynamic")
    # `-S train.max_steps=N` is the budget: the preset must not override it
    sized = config_from_dict({**raw, "preset": "budget", "train": {**raw["train"], "max_steps": 1234}})
    assert sized.train.max_steps == 1234 and sized.train.warmup == 74  # 6 % of 1234 = 74.04
    book = load_config(ROOT / "params.yaml")
    assert (book.train.optimizer, book.train.masking, book.train.grad_clip, book.model.tie_decoder) == \
        ("adam", "static", 0.0, False)
