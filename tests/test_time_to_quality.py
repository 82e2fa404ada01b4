"""bench.time_to_quality --smoke: the whole method on synthetic pairs, checked against plain fit + evaluate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")

from tiny_project import ROOT  # noqa: E402

from bench import hf_bert  # noqa: E402
from bench import time_to_quality as ttq


def plain_heldout(recipe: str, seed: int, steps: int) -> float:
    """The held-out MLM loss of a bench recipe (smoke sizes) trained for `steps` the plain way, `train_model`
    then `evaluate` on bench.time_to_quality's synthetic pairs: the benches' reference."""
    import dataclasses

    from minibert.evaluation.heldout import evaluate
    from minibert.training.train import train_model

    cfg = ttq.recipe_config(recipe, yaml.safe_load((ROOT / "params.yaml").read_text()), smoke=True)
    train, valid, V = ttq.smoke_data()
    tcfg = dataclasses.replace(cfg.train, seed=seed, max_steps=steps)
    model, _ = train_model(cfg.model, tcfg, train, V, device="cpu")
    return evaluate(model, valid, cfg.eval.batch_size, "cpu", progress=False)["mlm_loss"]


def test_smoke_run_interleaves_fits_schedules_to_budgets_and_reports(tmp_path):
    out = ttq.main(["--smoke", "--seeds", "0,1", "--recipes", "book,budget,hf", "--points", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    # interleaved: all of seed 0's runs before seed 1's, and within a seed budget 1's before budget 3's
    assert [r["seed"] for r in rows] == sorted(r["seed"] for r in rows)
    runs = list(dict.fromkeys((r["seed"], r["recipe"], r["budget"]) for r in rows if r["at_budget"]))
    assert {(s, n, b) for s, n, b in runs} == {(s, n, b) for s in (0, 1) for n in ("book", "budget", "hf") for b in (1, 3)}
    ends = {(r["seed"], r["recipe"], r["budget"]): r for r in rows if r["at_budget"]}
    for name in ("book", "budget", "hf"):
        s1, s3 = ends[(0, name, 1)]["step"], ends[(0, name, 3)]["step"]
        assert 3 * s1 <= s3 < 3 * (s1 + 1), name  # the same step time, three times the seconds
        assert ends[(1, name, 3)]["step"] == s3
    # the figures are those of a plain run of that many steps: the book read on its way to 3T, the budget
    # recipe's own T run (a schedule fitted to T's steps, not cut short from 3T's)
    for name in ("book", "budget"):
        r = ends[(1, name, 1)]
        assert r["mlm_loss"] == pytest.approx(plain_heldout(name, 1, r["step"]), abs=1e-6), name
    assert all(r["train_s"] > 0 and 0 <= r["mlm_accuracy"] <= 1 for r in rows)
    table = (out / "table.md").read_text()
    assert table.count(" ± ") == 3 * 6 and "| budget | 3T = " in table and "threads" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_inputs_put_the_static_masks_labels_at_their_positions():
    pairs = {"token_ids": np.array([[3, 2, 9, 4, 8, 4, 0], [3, 7, 2, 4, 2, 4, 0]]),
             "segments": np.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0]]),
             "valid_lens": np.array([6, 6]), "pred_positions": np.array([[1, 0], [2, 4]]),
             "mlm_weights": np.array([[1.0, 0.0], [1.0, 1.0]]), "mlm_labels": np.array([[11, 0], [12, 13]]),
             "nsp_labels": np.array([1, 0])}
    b = hf_bert.inputs(pairs, np.array([1, 0]))
    assert b["labels"].tolist() == [[-100, -100, 12, -100, 13, -100], [-100, 11, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1] * 6] * 2 and b["nsp"].tolist() == [0, 1]
    assert b["input_ids"].shape == (2, 6)  # trimmed to the longest pair


def test_a_recipe_can_turn_one_lever_of_a_preset_back():
    raw = yaml.safe_load((ttq.ROOT / "params.yaml").read_text())
    cfg = ttq.recipe_config("budget+train.grad_clip=0+model.tie_decoder=false", raw, smoke=False)
    assert (cfg.train.grad_clip, cfg.model.tie_decoder) == (0.0, False)
    assert (cfg.train.optimizer, cfg.train.masking, cfg.model.norm) == ("adamw", "dynamic", "pre")  # the rest kept
    assert ttq.recipe_config("book+train.lr=0.002", raw, smoke=False).train.lr == 0.002
    with pytest.raises(SystemExit, match="train.mask_rate"):  # static masks at the preset's 20 %: refused
        ttq.recipe_config("budget+train.masking=static", raw, smoke=False)
    with pytest.raises(SystemExit, match="section.key=value"):
        ttq.recipe_config("budget+grad_clip", raw, smoke=False)


def test_given_step_seconds_name_recipes_whose_names_hold_equals_signs():
    names = ["book", "budget+train.lr=0.005"]
    assert ttq.step_s_given("book=0.5584,budget+train.lr=0.005=0.1228", names) == \
        {"book": 0.5584, "budget+train.lr=0.005": 0.1228}
    assert ttq.step_s_given("", names) == {}
    for bad in ("pre_ln=0.3", "book=0", "book=fast", "budget+train.lr=0.005"):  # unknown, not > 0, not a number
        with pytest.raises(SystemExit, match="RECIPE=SECONDS"):
            ttq.step_s_given(bad, names)


def test_smoke_shrinks_the_batch_a_preset_sets():
    raw = yaml.safe_load((ttq.ROOT / "params.yaml").read_text())
    raw.setdefault("presets", {})["big"] = {"train": {"batch_size": 4096, "lr": 0.007}}
    cfg = ttq.recipe_config("big", raw, smoke=True)
    assert (cfg.train.batch_size, cfg.train.lr) == (16, 0.007)  # the tiny batch, the preset's own rate
