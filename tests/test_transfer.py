"""bench.transfer --smoke: every recipe x task x system x seed row, the pretrained model's held-out loss
against a plain fit + evaluate, and the table."""
from __future__ import annotations

import json

import pytest
from tiny_project import plain_heldout

from bench import transfer


def test_smoke_rows_heldout_and_table(tmp_path):
    out = transfer.main(["--smoke", "--recipes", "book:5,budget:7", "--seeds", "0,1", "--pretrain-seed", "3",
                         "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "system" in r]
    got = sorted((r["recipe"], r["system"], r["seed"]) for r in rows)
    want = sorted([(rec, s, k) for rec in ("book:5", "budget:7") for s in ("pretrained", "random_init", "bag_of_words")
                   for k in (0, 1)] + [(rec, "majority", 0) for rec in ("book:5", "budget:7")])
    assert got == want and {r["task"] for r in rows} == {"smoke"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and all(r["train_examples"] + r["test_examples"] == 99 for r in rows)
    pre = {r["recipe"]: r["pretrained"] for r in lines if "pretrained" in r and "system" not in r}
    for label, (name, steps) in {"book:5": ("book", 5), "budget:7": ("budget", 7)}.items():
        assert abs(pre[label]["mlm_loss"] - plain_heldout(name, 3, steps)) < 1e-6, label
    table = (out / "table.md").read_text()
    assert "| book:5 |" in table and "| budget:7 |" in table and "threads; pretrain seed 3" in table


def test_recipe_list_errors():
    assert transfer.parse_recipes("book:50,budget:2273") == [("book", 50), ("budget", 2273)]
    for bad in ("book", "book:0", ":5", "book:x"):
        with pytest.raises(SystemExit, match="RECIPE:STEPS"):
            transfer.parse_recipes(bad)
