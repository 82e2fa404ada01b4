"""bench.transfer --smoke, run as a user would (a subprocess): every recipe x adapt x labels x system x seed
row, the controls once per architecture, the kept models reused by a second run, and the table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "bench.transfer", "--smoke", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def rows(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return [r for r in lines if "system" in r], {r["recipe"]: r["pretrained"] for r in lines if "system" not in r}


def test_smoke_rows_controls_reuse_and_table(tmp_path):
    args = ("--recipes", "book:5,budget:7", "--seeds", "0,1", "--label-counts", "3,0", "--adapt", "0,4",
            "--pretrain-seed", "3", "--models", str(tmp_path / "models"))
    bench(*args, "--out", str(tmp_path / "a"))
    got, pre = rows(tmp_path / "a")
    keys = sorted((r["recipe"], r["adapt"], r["system"], r["labels"], r["seed"]) for r in got)
    # the pretrained column per recipe and adapt value; random init, bag-of-words and majority once per
    # architecture (book and budget differ: post-LN with dropout against pre-LN with a tied decoder)
    want = [(rec, a, "pretrained", n, k) for rec in ("book:5", "budget:7") for a in (0, 4) for n in (3, 0) for k in (0, 1)]
    want += [("controls", 0, s, n, k) for s in ("random_init", "bag_of_words", "majority") for n in (3, 0)
             for k in (0, 1)] * 2
    assert keys == sorted(want)
    assert all(0 <= r["accuracy"] <= 1 for r in got)
    # 3 labels per class of 3 classes: 9 training examples; all: the training split less its dev split
    assert {r["train_examples"] for r in got if r["labels"] == 3} == {9}
    assert len({r["train_examples"] for r in got if r["labels"] == 0}) == 1
    assert set(pre) == {"book:5", "budget:7"} and all(p["mlm_loss"] > 0 for p in pre.values())
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| book:5 | 4 | smoke | 3 |" in table and "| budget:7 | 0 | smoke | all |" in table
    # a second run finds both models kept: no pretraining, the same figures to the last digit
    assert len(list((tmp_path / "models").iterdir())) == 2
    bench(*args, "--out", str(tmp_path / "b"))
    again, pre_b = rows(tmp_path / "b")
    assert pre_b == pre and [r["accuracy"] for r in again] == [r["accuracy"] for r in got]


def test_recipe_list_and_set_errors():
    for bad in ("--recipes=book", "--recipes=book:0", "--recipes=:5", "--set=pooling=mean"):
        p = subprocess.run([sys.executable, "-m", "bench.transfer", "--smoke", bad], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode != 0 and ("RECIPE:STEPS" in p.stderr or "finetune.KEY=VALUE" in p.stderr), p.stderr
