"""minibert.data.corpus: verification, safe extraction, parquet rebuild, streamed download, fallback."""
from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile

import pytest

from minibert.config import DataConfig, Mirror
from minibert.data.corpus import (
    SHA256,
    SPLITS,
    TOKENS_SHA256,
    read_paragraphs,
    rebuild_from_parquet,
    safe_extract,
    split_file,
    tokens_sha256,
    verify_files,
)
from minibert.data.fetch import download, fetch_wikitext
from minibert.errors import DataError


def _zip(path, members: dict[str, bytes], symlink: str | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


# ---------------------------------------------------------------------------- verification


def test_real_files_match_both_hash_constants(wikitext_folder):
    assert verify_files(wikitext_folder) is True
    for split in SPLITS:
        assert tokens_sha256(split_file(wikitext_folder, split)) == TOKENS_SHA256[split]


def test_one_changed_byte_names_file_and_both_hashes(wikitext_folder, tmp_path):
    for split in SPLITS:
        shutil.copyfile(split_file(wikitext_folder, split), split_file(tmp_path, split))
    data = bytearray(split_file(tmp_path, "valid").read_bytes())
    data[4099] ^= 0x01
    split_file(tmp_path, "valid").write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        verify_files(tmp_path, token_level_ok=True)
    msg = str(e.value)
    assert "wiki.valid.tokens" in msg and SHA256["valid"] in msg
    assert hashlib.sha256(data).hexdigest() in msg and "\n" not in msg


def _strip_mirror(folder, out):
    """A mirror that strips every line and drops blank ones: same tokens and line breaks."""
    for split in SPLITS:
        text = split_file(folder, split).read_text(encoding="utf-8")
        split_file(out, split).write_text("".join(l.strip() + "\n" for l in text.splitlines() if l.strip()))


def test_stripped_text_passes_only_at_token_level(wikitext_folder, tmp_path):
    _strip_mirror(wikitext_folder, tmp_path)
    assert verify_files(tmp_path, token_level_ok=True) is False
    with pytest.raises(DataError, match="wiki.train.tokens has sha256"):
        verify_files(tmp_path)


def test_missing_and_empty_files_are_named(tmp_path):
    for split in SPLITS:
        split_file(tmp_path, split).write_text(" x \n")
    split_file(tmp_path, "test").unlink()
    with pytest.raises(DataError, match="wiki.test.tokens is missing"):
        verify_files(tmp_path, origin="SRC")
    split_file(tmp_path, "test").write_text("")
    with pytest.raises(DataError, match="^SRC: wiki.test.tokens is empty"):
        verify_files(tmp_path, origin="SRC")


# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("members, symlink, why", [
    ({"wikitext-2/../x": b"evil"}, None, "a '..' path"),
    ({"/tmp/abs_x": b"evil"}, None, "an absolute path"),
    ({"wikitext-2/wiki.train.tokens": b" a\n"}, "wikitext-2/link", "a symlink"),
    ({"wikitext-2/wiki.train.tokens": b"\0" * (3 << 20)}, None, "compression ratio"),
])
def test_unsafe_archives_are_refused_before_writing(tmp_path, members, symlink, why):
    archive = _zip(tmp_path / "bad.zip", members, symlink)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=why):
        safe_extract(archive, out)
    assert list(out.iterdir()) == [] and not (tmp_path / "x").exists()


def test_extract_flattens_and_requires_each_file_once(tmp_path):
    members = {f"wikitext-2/wiki.{s}.tokens": f" {s} 13 .\n".encode() for s in SPLITS}
    safe_extract(_zip(tmp_path / "ok.zip", members), tmp_path)
    assert split_file(tmp_path, "valid").read_text() == " valid 13 .\n"
    members["other/wiki.test.tokens"] = b"x"
    with pytest.raises(DataError, match="2 members named wiki.test.tokens"):
        safe_extract(_zip(tmp_path / "dup.zip", members), tmp_path / "absent")  # fails before writing


def test_truncated_zip_is_a_data_error(wikitext_zip, tmp_path):
    cut = tmp_path / "cut.zip"
    cut.write_bytes(wikitext_zip.read_bytes()[: wikitext_zip.stat().st_size * 2 // 3])
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="zip archive"):
        safe_extract(cut, tmp_path / "out")


# ---------------------------------------------------------------------------- parquet


def test_hf_parquet_rebuilds_the_exact_bytes(hf_parquet_dir, tmp_path):
    parquet = {"train": next(hf_parquet_dir.glob("train*")), "valid": next(hf_parquet_dir.glob("validation*")),
               "test": next(hf_parquet_dir.glob("test*"))}
    rebuild_from_parquet(parquet, tmp_path)
    assert verify_files(tmp_path) is True


def test_parquet_rows_are_canonicalised(wikitext_folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _strip_mirror(wikitext_folder, tmp_path)
    for split in SPLITS:
        rows = split_file(tmp_path, split).read_text(encoding="utf-8").splitlines()
        pq.write_table(pa.table({"text": rows}), tmp_path / f"{split}.parquet")
    out = tmp_path / "out"
    out.mkdir()
    rebuild_from_parquet({s: tmp_path / f"{s}.parquet" for s in SPLITS}, out)
    assert verify_files(out, token_level_ok=True) is False  # the blank lines are gone for good
    for split in SPLITS:  # ... but the book's paragraphs are all there
        assert read_paragraphs(split_file(out, split)) == read_paragraphs(split_file(wikitext_folder, split))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"line": ["a"] * 7}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        rebuild_from_parquet({s: tmp_path / "p.parquet" for s in SPLITS}, tmp_path)


# ---------------------------------------------------------------------------- http


def test_download_streams_and_reports_progress(http_server, tmp_path, capsys):
    payload = bytes(range(256)) * 9973  # ~2.4 MiB: several 1 MiB reads
    (http_server.root / "blob.bin").write_bytes(payload)
    download(http_server.url("blob.bin"), tmp_path / "blob.bin", timeout=5, retries=0)
    assert (tmp_path / "blob.bin").read_bytes() == payload
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].endswith("2.4/2.4 MiB") and all(l.startswith("download: http://") for l in lines)


@pytest.mark.parametrize("faults", [["500"], ["truncate"], ["500", "truncate"]])
def test_download_retries_transient_failures(http_server, tmp_path, faults):
    (http_server.root / "f.txt").write_bytes(b"13 bytes here" * 99)
    http_server.plan["/f.txt"] = list(faults)
    download(http_server.url("f.txt"), tmp_path / "f.txt", timeout=5, retries=len(faults))
    assert (tmp_path / "f.txt").read_bytes() == b"13 bytes here" * 99
    assert http_server.hits["/f.txt"] == len(faults) + 1


def test_download_gives_up_after_retries_and_skips_404(http_server, tmp_path):
    (http_server.root / "f.txt").write_text("x")
    http_server.plan["/f.txt"] = ["500"] * 3
    with pytest.raises(DataError, match=r"HTTP 500 .*\(3 attempts\)"):
        download(http_server.url("f.txt"), tmp_path / "f.txt", timeout=5, retries=2)
    with pytest.raises(DataError, match=r"HTTP 404 .*\(1 attempt\)"):
        download(http_server.url("absent.txt"), tmp_path / "a.txt", timeout=5, retries=2)
    assert http_server.hits["/absent.txt"] == 1


def test_download_times_out(http_server, tmp_path):
    (http_server.root / "f.txt").write_text("x")
    http_server.plan["/f.txt"] = ["stall"]
    with pytest.raises(DataError, match=r"timed out \(1 attempt\)"):
        download(http_server.url("f.txt"), tmp_path / "f.txt", timeout=0.3, retries=0)


def test_fetch_falls_back_from_a_broken_zip_to_parquet(http_server, hf_parquet_dir, tmp_path):
    (http_server.root / "wikitext-2-v1.zip").write_bytes(b"not a zip at all")
    for p in hf_parquet_dir.iterdir():
        shutil.copyfile(p, http_server.root / p.name)
    names = {"train": "train", "valid": "validation", "test": "test"}
    cfg = DataConfig(timeout_s=5, retries=0, mirrors={"wikitext-2": Mirror(
        http_server.url("wikitext-2-v1.zip"), {s: http_server.url(f"{n}-00000-of-00001.parquet") for s, n in names.items()})})
    dest = tmp_path / "raw" / "wikitext-2"
    source = fetch_wikitext(cfg, dest)
    assert source.startswith("parquet http://127.0.0.1:") and "token-level" not in source
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"wiki.{s}.tokens" for s in SPLITS)
    assert verify_files(dest) and sorted(p.name for p in dest.parent.iterdir()) == ["wikitext-2"]


def test_corrupt_member_data_is_a_data_error(wikitext_zip, tmp_path):
    data = bytearray(wikitext_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside train's deflate stream: bad block or bad CRC
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="zip archive"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")


# ---------------------------------------------------------------------------- WikiText-103


def test_wikitext_103_pins_are_the_published_sha1s():
    from minibert.data.corpus import PINS
    # GluonNLP's dataset records, as quoted in issue 15 (an independent source: not this code)
    assert PINS["wikitext-103"].checksums == {
        "train": ("sha1", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
        "valid": ("sha1", "c326ac59dc587676d58c422eb8a03e119582f92b"),
        "test": ("sha1", "8a5befc548865cec54ed4273cf87dbbad60d1e47")}
    assert PINS["wikitext-103"].tokens is None


def fake_103() -> dict[str, bytes]:
    """Small files in WikiText's shape (the real 103 is 540 MB and cannot be fetched here)."""
    body = " = Valkyria = \n \n the game began development in 2010 . it was <unk> . \n"
    return {s: (body * (i + 2)).encode() for i, s in enumerate(SPLITS)}


def sha1s(files: dict[str, bytes]) -> dict[str, tuple[str, str]]:
    return {s: ("sha1", hashlib.sha1(b).hexdigest()) for s, b in files.items()}


CFG_103 = DataConfig(corpus="wikitext-103", timeout_s=5, retries=0)


def test_wikitext_103_zip_is_checked_against_the_given_table(tmp_path):
    files = fake_103()
    archive = _zip(tmp_path / "wikitext-103-v1.zip", {f"wikitext-103/wiki.{s}.tokens": b for s, b in files.items()})
    note = fetch_wikitext(CFG_103, tmp_path / "raw", local=archive, checksums=sha1s(files))
    assert note == f"local zip {archive}"
    assert {s: split_file(tmp_path / "raw", s).read_bytes() for s in SPLITS} == files


def test_wikitext_103_without_a_table_meets_the_real_pins(tmp_path):
    files = fake_103()
    archive = _zip(tmp_path / "w.zip", {f"wikitext-103/wiki.{s}.tokens": b for s, b in files.items()})
    with pytest.raises(DataError) as e:
        fetch_wikitext(CFG_103, tmp_path / "raw", local=archive)
    assert (f"wiki.train.tokens has sha1 {hashlib.sha1(files['train']).hexdigest()}, expected "
            "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211; the file is corrupt or not wikitext-103 v1") in str(e.value)
    assert not (tmp_path / "raw").exists()
    wrong = {**sha1s(files), "test": ("sha1", "0" * 40)}  # the override is a table like the pins, not a bypass
    with pytest.raises(DataError, match="wiki.test.tokens has sha1"):
        fetch_wikitext(CFG_103, tmp_path / "raw", local=archive, checksums=wrong)


@pytest.mark.parametrize("members,symlink,why", [
    ({"../wiki.train.tokens": b"x"}, None, "a '..' path"),
    ({}, "wikitext-103/wiki.train.tokens", "a symlink"),
    ({"wikitext-103/wiki.train.tokens": b"\0" * (2 << 20)}, None, "a compression ratio over 100"),
])
def test_wikitext_103_archives_get_the_same_safety_checks(tmp_path, members, symlink, why):
    archive = _zip(tmp_path / "w.zip", members, symlink)
    with pytest.raises(DataError, match=f"is {why}.*use an intact wikitext-103-v1.zip"):
        fetch_wikitext(CFG_103, tmp_path / "raw", local=archive, checksums=sha1s(fake_103()))
    assert not (tmp_path / "raw").exists()


def test_wikitext_103_through_its_mirrors_zip_then_two_file_parquet(http_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = fake_103()
    (http_server.root / "wikitext-103-v1.zip").write_bytes(b"broken")  # the first mirror fails
    urls = {}
    for s, data in files.items():
        rows = [l.removeprefix(" ").removesuffix(" \n") for l in data.decode().splitlines(keepends=True)]
        parts = [rows[: len(rows) // 2], rows[len(rows) // 2:]] if s == "train" else [rows]
        urls[s] = []
        for i, part in enumerate(parts):
            name = f"{s}-{i:05d}-of-{len(parts):05d}.parquet"
            pq.write_table(pa.table({"text": part}), http_server.root / name)
            urls[s].append(http_server.url(name))
    cfg = DataConfig(corpus="wikitext-103", timeout_s=5, retries=0, mirrors={"wikitext-103": Mirror(
        http_server.url("wikitext-103-v1.zip"), {s: tuple(u) for s, u in urls.items()})})
    note = fetch_wikitext(cfg, tmp_path / "raw", checksums=sha1s(files))
    assert note.startswith("parquet http://127.0.0.1") and len(urls["train"]) == 2
    assert {s: split_file(tmp_path / "raw", s).read_bytes() for s in SPLITS} == files


# ---------------------------------------------------------------------------- a valid zip, wrong text


@pytest.fixture
def wrong_text_zip(wikitext_folder, tmp_path):
    """The official layout, every member intact for zip (CRCs match), but one byte of the valid
    text changed: only the content hashes can tell."""
    data = bytearray(split_file(wikitext_folder, "valid").read_bytes())
    data[4099] ^= 0x01
    members = {f"wikitext-2/wiki.{s}.tokens": split_file(wikitext_folder, s).read_bytes() for s in ("train", "test")}
    members["wikitext-2/wiki.valid.tokens"] = bytes(data)
    return _zip(tmp_path / "wikitext-2-v1.zip", members), hashlib.sha256(data).hexdigest()


def test_local_zip_with_wrong_text_is_refused(wrong_text_zip, tmp_path):
    archive, got = wrong_text_zip
    dest = tmp_path / "raw" / "wikitext-2"
    dest.parent.mkdir()
    with pytest.raises(DataError, match=f"wiki.valid.tokens has sha256 {got}, expected {SHA256['valid']}"):
        fetch_wikitext(DataConfig(), dest, local=archive)
    assert list(dest.parent.iterdir()) == []  # no output, no temp folder


def test_zip_url_with_wrong_text_is_refused(wrong_text_zip, http_server, tmp_path):
    archive, got = wrong_text_zip
    shutil.copyfile(archive, http_server.root / "wikitext-2-v1.zip")
    cfg = DataConfig(mirrors={"wikitext-2": Mirror(http_server.url("wikitext-2-v1.zip"))}, timeout_s=5, retries=0)
    dest = tmp_path / "raw" / "wikitext-2"
    dest.parent.mkdir()
    with pytest.raises(DataError, match=f"zip_url: .*wiki.valid.tokens has sha256 {got}"):
        fetch_wikitext(cfg, dest)
    assert http_server.hits["/wikitext-2-v1.zip"] == 1 and list(dest.parent.iterdir()) == []
