"""Where downstream data comes from: MINIBERT_TASK_DATA verified against the pins, else a download into the
cache over a real (loopback) HTTP server, kept only when its sha256 matches."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from minibert.data import pinned as pins
from minibert.data.pinned import ENV, Source, locate
from minibert.errors import DataError


def test_pins_match_the_shared_copies_own_sums(task_data):
    """The pins in the code against ../shared/data/downstream/SHA256SUMS, written by whoever fetched the files."""
    sums = dict(reversed(line.split()) for line in (task_data / "SHA256SUMS").read_text().splitlines() if line.strip())
    checked = 0
    for entries in pins.SOURCES.values():
        for s in entries:
            if s.name in sums:
                assert s.sha256 == sums[s.name], s.name
                checked += 1
    assert checked == 5  # bbc-news.tar.gz, polarity, simlex999, wordsim353, blimp.zip
    for name in ("bbc", "polarity", "simlex999", "wordsim353", "blimp"):
        assert locate(name, {ENV: str(task_data)}).parent == task_data


def test_a_corrupt_local_copy_is_refused(tmp_path):
    (tmp_path / "simlex999.txt").write_text("old\tnew\t1.58\n")
    with pytest.raises(DataError) as e:
        locate("simlex999", {ENV: str(tmp_path)})
    assert "is not the pinned" in str(e.value) and "simlex999.txt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="holds no pang_lee_polarity.cor"):
        locate("polarity", {ENV: str(tmp_path)})
    with pytest.raises(DataError, match="not a folder"):
        locate("polarity", {ENV: str(tmp_path / "absent")})


def _serve(http_server, monkeypatch, body: bytes, pinned: bytes) -> None:
    (http_server.root / "judgements.txt").write_bytes(body)
    src = Source("judgements.txt", http_server.url("judgements.txt"), hashlib.sha256(pinned).hexdigest(), "a test")
    monkeypatch.setitem(pins.SOURCES, "simlex999", (src,))


def test_download_into_the_cache_once(http_server, monkeypatch, tmp_path):
    body = b"old\tnew\t1.58\nsmart\tintelligent\t9.2\n"
    _serve(http_server, monkeypatch, body, body)
    cache = tmp_path / "cache"
    path = locate("simlex999", {}, cache)
    assert path == cache / "judgements.txt" and path.read_bytes() == body
    assert locate("simlex999", {}, cache) == path  # the second call reads the cache
    assert http_server.hits["/judgements.txt"] == 1
    assert sorted(p.name for p in cache.iterdir()) == ["judgements.txt"]


def test_a_download_with_other_bytes_leaves_nothing(http_server, monkeypatch, tmp_path):
    _serve(http_server, monkeypatch, b"tampered\tfile\t1\n", b"the published bytes")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="is not the pinned"):
        locate("simlex999", {}, cache)
    assert list(cache.iterdir()) == []  # no temp file, no unverified file


def test_the_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pins.cache_dir() == Path(tmp_path) / "minibert" / "downstream"


def test_a_corrupt_cached_copy_is_never_used(http_server, monkeypatch, tmp_path):
    """A copy in the download cache whose bytes are not the pinned ones (a truncated download of an older
    version, a tampered file): locate refuses it, or fetches the pinned bytes again; it never hands it on."""
    body = b"old\tnew\t1.58\nsmart\tintelligent\t9.2\n"
    _serve(http_server, monkeypatch, body, body)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "judgements.txt").write_bytes(b"old\tnew\t9.99\n")  # same name, other bytes
    try:
        path = locate("simlex999", {}, cache)
    except DataError as e:
        assert "is not the pinned" in str(e) and "judgements.txt" in str(e)
    else:
        assert path.read_bytes() == body
