"""minibert.data.text: the user's own .txt files as a corpus — normalisation, the sentence rule, the
1-in-20 held-out rule, the content hash, and one clear line for each kind of bad input."""
from __future__ import annotations

import hashlib
import json

import pytest

from minibert.data.corpus import read_paragraphs, split_file
from minibert.data.text import fetch_text, normalise, wikitext_words
from minibert.errors import DataError


def test_normalise_hand_cases():
    assert normalise("Hello, World! Don't stop.\n") == "hello , world ! don't stop ."
    assert normalise("  Café (1999): 3.5 e.g. x_y  ") == "café ( 1999 ) : 3 . 5 e . g . x _ y"
    assert normalise("") == ""


def test_wikitext_words_split_clitics_as_wikitext_writes_them():
    assert wikitext_words("Don't") == ["do", "n't"]
    assert wikitext_words("John's dog can't") == ["john", "'s", "dog", "ca", "n't"]
    assert wikitext_words("John\u2019s") == ["john", "'s"]  # the curly apostrophe reads as the straight one
    assert wikitext_words("They're sure we'll go, I'm told; she'd I've.") == [
        "they", "'re", "sure", "we", "'ll", "go", ",", "i", "'m", "told", ";", "she", "'d", "i", "'ve", "."]
    assert wikitext_words("Plain words, no clitics.") == normalise("Plain words, no clitics.").split()


def paragraphs(n: int, start: int = 0) -> list[str]:
    """n two-sentence lines with a running number: 'Line 7 says Hi. It ends, here.'"""
    return [f"Line {i} says Hi. It ends, here.\n" for i in range(start, start + n)]


def test_text_folder_becomes_three_wikitext_splits(tmp_path):
    src = tmp_path / "mytext"
    (src / "sub").mkdir(parents=True)
    # b.txt sorts after a.txt; sub/c.txt after both; one-sentence lines and blanks are dropped; a BOM is dropped
    (src / "a.txt").write_text("\ufeff" + "".join(paragraphs(13)) + "Just one sentence.\n\n", encoding="utf-8")
    (src / "b.txt").write_text("".join(paragraphs(13, 13)), encoding="utf-8")
    (src / "sub" / "c.txt").write_text("".join(paragraphs(14, 26)), encoding="utf-8")
    (src / "notes.md").write_text("Not. Read.\n")
    dest = tmp_path / "raw"
    note = fetch_text(str(src), dest)
    lines = {s: split_file(dest, s).read_text(encoding="utf-8").splitlines() for s in ("train", "valid", "test")}
    want = lambda ks: [f" line {k} says hi . it ends , here . " for k in ks]  # noqa: E731
    assert lines["valid"] == want([10, 30]) and lines["test"] == want([19, 39])
    assert lines["train"] == want(k for k in range(40) if k % 20 not in (10, 19))
    assert read_paragraphs(split_file(dest, "valid")) == [
        [["line", "10", "says", "hi"], ["it", "ends", ",", "here", "."]],
        [["line", "30", "says", "hi"], ["it", "ends", ",", "here", "."]]]
    source = json.loads((dest / "source.json").read_text())
    files = [src / "a.txt", src / "b.txt", src / "sub" / "c.txt"]
    assert [f["path"] for f in source["files"]] == [str(f) for f in files]
    assert [f["sha256"] for f in source["files"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert source["paragraphs"] == 40 and source["sha256"][:12] in note


def test_a_glob_takes_only_what_it_matches(tmp_path):
    (tmp_path / "keep.txt").write_text("".join(paragraphs(20)))
    (tmp_path / "skip.txt").write_text("".join(paragraphs(20, 100)))
    fetch_text(str(tmp_path / "k*.txt"), tmp_path / "raw")
    assert "line 100" not in split_file(tmp_path / "raw", "train").read_text()


def bad_input(tmp_path, case: str):
    src = tmp_path / "src"
    src.mkdir()
    if case == "empty folder":
        (src / "readme.md").write_text("no text here")
        return str(src), "the folder holds no .txt files"
    if case == "no match":
        return str(src / "*.txt"), "matches no files"
    if case == "binary":
        (src / "a.txt").write_text("".join(paragraphs(30)))
        (src / "b.txt").write_bytes(b"PK\x03\x04\x00\x00binary. stuff.\n")
        return str(src), r"b.txt: a binary file \(NUL byte on line 1\)"
    if case == "not utf-8":
        (src / "a.txt").write_bytes("".join(paragraphs(30)).encode() + "Caf\xe9 au lait. Oui.\n".encode("latin-1"))
        return str(src), r"a.txt:31: not UTF-8 \(byte 0xe9 at column 4\); re-save it as UTF-8"
    if case == "no two-sentence paragraph":
        (src / "a.txt").write_text("One sentence only.\nAnother one\n\nA question? An exclamation!\n")
        return str(src), "no paragraph with two '.'-separated sentences in 1 file"
    if case == "too few paragraphs":
        (src / "a.txt").write_text("".join(paragraphs(19)))
        return str(src), "only 19 paragraph"
    raise AssertionError(case)


CASES = ["empty folder", "no match", "binary", "not utf-8", "no two-sentence paragraph", "too few paragraphs"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, case):
    glob, message = bad_input(tmp_path, case)
    with pytest.raises(DataError, match=message) as e:
        fetch_text(glob, tmp_path / "raw")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "raw").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
