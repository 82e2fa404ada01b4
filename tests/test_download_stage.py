"""`python -m stages.download` as a user runs it: real subprocess, real exit code and stderr."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from minibert.data.corpus import SPLITS, split_file, verify_files

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(f"wiki.{s}.tokens" for s in SPLITS)


def run_stage(tmp_path: Path, local: str | Path | None, data: dict | None = None):
    """Run the stage with MINIBERT_DATA=`local` (unset if None) and a params file's `data` section."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data or {"timeout_s": 5, "retries": 0}}))
    env = {k: v for k, v in os.environ.items() if k != "MINIBERT_DATA"}
    if local is not None:
        env["MINIBERT_DATA"] = str(local)
    out = tmp_path / "data" / "raw" / "wikitext-2"
    proc = subprocess.run([sys.executable, "-m", "stages.download", "--params", str(params), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc, out


def assert_failed(proc, out: Path, *phrases: str) -> str:
    """Exit 1, exactly one `error: download:` line (the last), and nothing left on disk."""
    lines = proc.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("error: download: ")]
    assert proc.returncode == 1 and len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert all(l.startswith("download: ") for l in lines[:-1]), proc.stderr  # progress notes only
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no temp folders either
    return errors[0]


def assert_ok(proc, out: Path, source: str) -> None:
    assert proc.returncode == 0, proc.stderr
    assert f"(from {source}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert verify_files(out) and sorted(p.name for p in out.parent.iterdir()) == ["wikitext-2"]


# ---------------------------------------------------------------------------- happy paths


def test_local_zip_and_folder(wikitext_zip, wikitext_folder, tmp_path):
    proc, out = run_stage(tmp_path, wikitext_zip)
    assert_ok(proc, out, "local zip")
    proc, out = run_stage(tmp_path, wikitext_folder)  # replaces the previous output whole
    assert_ok(proc, out, "local folder")


def test_local_parquet_folder(hf_parquet_dir, tmp_path):
    proc, out = run_stage(tmp_path, hf_parquet_dir)
    assert_ok(proc, out, "local parquet")


def test_zip_over_http(wikitext_zip, http_server, tmp_path):
    shutil.copyfile(wikitext_zip, http_server.root / "wikitext-2-v1.zip")
    http_server.plan["/wikitext-2-v1.zip"] = ["truncate"]  # the first attempt is cut short
    proc, out = run_stage(tmp_path, None, {"mirrors": {"wikitext-2": {"zip_url": http_server.url("wikitext-2-v1.zip")}},
                                           "retries": 1})
    assert_ok(proc, out, http_server.url("wikitext-2-v1.zip"))
    assert http_server.hits["/wikitext-2-v1.zip"] == 2
    assert "MiB" in proc.stderr.splitlines()[-1]  # plain progress lines: stderr is not a TTY


def test_parquet_over_http_after_zip_fails(hf_parquet_dir, http_server, closed_port_url, tmp_path):
    for p in hf_parquet_dir.iterdir():
        shutil.copyfile(p, http_server.root / p.name)
    names = {"train": "train", "valid": "validation", "test": "test"}
    data = {"retries": 0, "timeout_s": 5, "mirrors": {"wikitext-2": {
        "zip_url": f"{closed_port_url}/wikitext-2-v1.zip",
        "parquet_urls": {s: http_server.url(f"{n}-00000-of-00001.parquet") for s, n in names.items()}}}}
    proc, out = run_stage(tmp_path, None, data)
    assert_ok(proc, out, "parquet http://127.0.0.1")


# ---------------------------------------------------------------------------- bad input


def _fake_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for split in SPLITS:
        split_file(folder, split).write_text(f" {split} 13 . 7 .\n")
    return folder


def test_folder_missing_train(tmp_path):
    folder = _fake_folder(tmp_path)
    split_file(folder, "train").unlink()
    assert_failed(*run_stage(tmp_path, folder), f"MINIBERT_DATA={folder}", "wiki.train.tokens is missing")


def test_folder_empty_train(tmp_path):
    folder = _fake_folder(tmp_path)
    split_file(folder, "train").write_text("")
    assert_failed(*run_stage(tmp_path, folder), "wiki.train.tokens is empty")


def test_not_a_zip(tmp_path):
    (tmp_path / "w.zip").write_text("PK? no, just text\n" * 37)
    assert_failed(*run_stage(tmp_path, tmp_path / "w.zip"), "not a zip archive", "set MINIBERT_DATA")


def test_truncated_zip(wikitext_zip, tmp_path):
    (tmp_path / "w.zip").write_bytes(wikitext_zip.read_bytes()[:99_999])
    assert_failed(*run_stage(tmp_path, tmp_path / "w.zip"), "zip archive")


@pytest.mark.parametrize("member, why", [("wikitext-2/../x", "'..' path"), ("/etc/x", "absolute path"),
                                         ("wikitext-2/link", "symlink")])
def test_unsafe_zip(tmp_path, member, why):
    with zipfile.ZipFile(tmp_path / "w.zip", "w") as zf:
        info = zipfile.ZipInfo(member)
        if why == "symlink":
            info.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(info, "../../etc/passwd")
        for split in SPLITS:
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", " 13 .\n")
    err = assert_failed(*run_stage(tmp_path, tmp_path / "w.zip"), repr(member), why)
    assert not (tmp_path / "data" / "raw" / "x").exists() and "refusing" in err


def test_one_byte_changed(wikitext_folder, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(wikitext_folder, folder)
    data = bytearray(split_file(folder, "test").read_bytes())
    data[-3] = ord("X")
    split_file(folder, "test").write_bytes(bytes(data))
    assert_failed(*run_stage(tmp_path, folder), "wiki.test.tokens has sha256", "expected d790b833")


def test_nonexistent_path(tmp_path):
    assert_failed(*run_stage(tmp_path, tmp_path / "nope.zip"), "no such file or folder", "set MINIBERT_DATA")


def test_every_mirror_fails(closed_port_url, tmp_path):
    data = {"retries": 1, "timeout_s": 5, "mirrors": {"wikitext-2": {
        "zip_url": f"{closed_port_url}/w.zip", "parquet_urls": {s: f"{closed_port_url}/{s}.parquet" for s in SPLITS}}}}
    err = assert_failed(*run_stage(tmp_path, None, data), "every source failed",
                        f"zip_url: {closed_port_url}/w.zip", f"parquet_urls: {closed_port_url}/train.parquet",
                        "(2 attempts)", "set MINIBERT_DATA to a local")
    assert "refused" in err.lower()
