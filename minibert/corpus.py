"""WikiText-2 on disk: the book's paragraph rule.

(The download half — mirrors, checksums, safe extraction — is being added beside this.)
"""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "valid", "test")


def split_file(raw_dir: str | Path, split: str) -> Path:
    """`data/raw/wikitext-2/wiki.<split>.tokens`."""
    return Path(raw_dir) / f"wiki.{split}.tokens"


def read_paragraphs(path: str | Path) -> list[list[list[str]]]:
    """Paragraphs → sentences → tokens, by the d2l book's rule exactly.

    A line is a paragraph if it holds at least two ' . '-separated sentences; it is
    stripped, lower-cased and split on ' . '; a sentence's tokens are its whitespace split.
    (The separating '.' tokens are dropped, the last sentence keeps its final '.'.)
    """
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    return [[s.split() for s in line.strip().lower().split(" . ")]
            for line in lines if len(line.split(" . ")) >= 2]
