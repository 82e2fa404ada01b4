"""The user's own text as a corpus: `.txt` files → WikiText-shaped `wiki.{train,valid,test}.tokens`.

`fetch_text(text_glob, dest)` reads the files `text_glob` names (a folder: every `*.txt` below it;
otherwise a glob), in sorted path order, line by line (memory does not grow with the corpus), and
writes the three split files the tokenize stage reads, so the rest of the pipeline is unchanged.

Rules (documented contract):
* one paragraph per line; a UTF-8 byte-order mark at the start of a file is dropped.
* normalisation, because the text is not pre-tokenized like WikiText: lower-case, then tokens are
  runs of letters/digits (an apostrophe between two such runs stays inside: "don't") and every
  other non-space character on its own ("end." → "end ."). `normalise` does this.
* sentences: the book's rule on the normalised line — a sentence ends at a "." token (so "?" and
  "!" do not end one; "e.g." does), and a line is a paragraph only with at least two sentences.
  Other lines are dropped, as the book drops them from WikiText.
* held-out splits: of the kept paragraphs, in order, number k goes to valid when k % 20 == 10,
  to test when k % 20 == 19, else to train (5 % each, spread through the corpus; adding text at
  the end never moves an earlier paragraph to another split). At least 20 paragraphs are needed.
* identity: the text is the user's, so nothing is pinned; `source.json` beside the split files
  records each file's sha256 and one hash over all of them, and DVC records the folder's hash in
  `dvc.lock`. DVC does not watch the text itself: after editing it run `dvc repro -f download`.

Bad input stops with one line naming the file: no files, a binary file (a NUL byte), a file that
is not UTF-8 (the line and byte), or no paragraph of two sentences anywhere.
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

from minibert.artifacts import atomic_dir
from minibert.data.corpus import SPLITS, paragraph, split_file
from minibert.errors import DataError

TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|\S")
HELDOUT_EVERY = 20  # paragraph k: k % 20 == 10 → valid, k % 20 == 19 → test
FIX = "the text corpus takes UTF-8 .txt files, one paragraph per line"


def normalise(line: str) -> str:
    """Lower-case, punctuation split: "Hello, World." → "hello , world ."."""
    return " ".join(TOKEN.findall(line.lower()))


# WikiText's tokenizer writes clitics as words of their own ("do n't", "john 's", "they 're"): text read
# for the pretrained vocabulary must split them the same way, or each one is an <unk>.
CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def wikitext_words(line: str) -> list[str]:
    """`normalise`, then clitics split off as WikiText writes them: "Don't" → ["do", "n't"]."""
    out = []
    for word in normalise(line.replace("\u2019", "'")).split():
        m = CLITIC.match(word) if "'" in word else None
        out += [m.group(1), m.group(2)] if m else [word]
    return out


def heldout_split(k: int) -> str:
    return {HELDOUT_EVERY // 2: "valid", HELDOUT_EVERY - 1: "test"}.get(k % HELDOUT_EVERY, "train")


def text_files(text_glob: str) -> list[Path]:
    """The files `text_glob` names, sorted; a DataError when there are none."""
    where = Path(text_glob).expanduser()
    if where.is_dir():
        files = sorted(p for p in where.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.text_glob={text_glob!r}: the folder holds no .txt files; {FIX}")
        return files
    files = sorted(Path(p) for p in glob.glob(str(where), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.text_glob={text_glob!r}: matches no files; point it at a folder or glob of .txt files")
    return files


def _lines(path: Path, digest) -> Iterator[str]:
    """Decoded lines of one file, checked: binary (NUL) and non-UTF-8 files raise one clear line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            digest.update(raw)
            if b"\0" in raw:
                raise DataError(f"{path}: a binary file (NUL byte on line {number}); {FIX}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"re-save it as UTF-8 ({FIX})") from None
            yield line.removeprefix("\ufeff") if number == 1 else line


def fetch_text(text_glob: str, dest: str | Path) -> str:
    """Write `dest/wiki.{split}.tokens` and `dest/source.json` from the user's files (module doc)."""
    files = text_files(text_glob)
    record, kept = [], 0
    with atomic_dir(dest) as out:
        outs = {split: open(split_file(out, split), "w", encoding="utf-8") for split in SPLITS}
        try:
            for path in files:
                digest = hashlib.sha256()
                for line in _lines(path, digest):
                    norm = normalise(line)
                    if paragraph(norm) is None:
                        continue
                    outs[heldout_split(kept)].write(f" {norm} \n")
                    kept += 1
                record.append({"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
        finally:
            for f in outs.values():
                f.close()
        if kept == 0:
            raise DataError(f"data.text_glob={text_glob!r}: no paragraph with two '.'-separated sentences in "
                            f"{len(files)} file(s); {FIX}")
        if kept < HELDOUT_EVERY:
            raise DataError(f"data.text_glob={text_glob!r}: only {kept} paragraph(s) of two sentences; need at "
                            f"least {HELDOUT_EVERY} (1 in {HELDOUT_EVERY} is held out for valid and for test)")
        total = hashlib.sha256("".join(f"{r['sha256']}  {r['path']}\n" for r in record).encode()).hexdigest()
        (out / "source.json").write_text(json.dumps({"corpus": "text", "text_glob": text_glob, "sha256": total,
                                                     "paragraphs": kept, "files": record}, indent=2) + "\n")
    return f"{len(files)} text file(s) {text_glob!r}, {kept} paragraphs, sha256 {total[:12]}…"
