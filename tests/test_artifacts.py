"""minibert.artifacts' writers on a filesystem that is full, read-only or refuses: one WriteError line
(the output, the free space, the room needed), no temp left, the previous output byte for byte.
Real: a tmpfs mounted by the test (skipped where not allowed); beside it OSError(ENOSPC) and
safetensors' own error injected at the writer."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from minibert import artifacts
from minibert.artifacts import all_or_nothing, atomic_dir, save_arrays, write_errno, write_json
from minibert.errors import WriteError

BIG = {"x": np.ones((600, 1000), np.float32)}  # 2.4 MB: more than the 1 MB filesystems below


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.startswith("cannot write "), msg
    return msg


def test_full_filesystem_keeps_the_previous_file_and_leaves_no_temp(small_fs):
    fs = small_fs("1m")
    write_json(fs / "m.json", {"old": 1})
    before = (fs / "m.json").read_bytes()
    with pytest.raises(WriteError) as err:
        save_arrays(fs / "m.json", BIG)
    msg = one_line(err.value)
    assert str(fs / "m.json") in msg and os.strerror(errno.ENOSPC) in msg and "free there" in msg
    assert (fs / "m.json").read_bytes() == before
    assert sorted(os.listdir(fs)) == ["m.json"]


def test_full_filesystem_keeps_the_previous_folder(small_fs):
    fs = small_fs("1m")
    with atomic_dir(fs / "out") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(WriteError, match=r"cannot write .*/out: No space left on device \(.* free there, 2.4 MB needed\)"):
        with atomic_dir(fs / "out", need=2_400_000) as tmp:
            (tmp / "a").write_text("new")
            save_arrays(tmp / "big.safetensors", BIG)
    assert (fs / "out/a").read_text() == "old" and sorted(os.listdir(fs)) == ["out"]


def test_read_only_filesystem_is_one_line(small_fs):
    import subprocess

    fs = small_fs("1m")
    write_json(fs / "m.json", {"old": 1})
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    with pytest.raises(WriteError) as err:
        write_json(fs / "m.json", {"new": 2})
    assert os.strerror(errno.EROFS) in one_line(err.value) and "read-only" in str(err.value)
    assert (fs / "m.json").read_text() == '{\n  "old": 1\n}\n'


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    OSError(errno.EDQUOT, "Disk quota exceeded"),
                                    RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")])
def test_injected_failure_at_the_writer(tmp_path, monkeypatch, raised):
    """What safetensors' save_file raises is an OSError or, from its Rust writer, `(os error 28)` in text."""
    save_arrays(tmp_path / "a.safetensors", {"x": np.zeros(3, np.float32)})
    before = (tmp_path / "a.safetensors").read_bytes()

    def failing(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")  # a torn write, then the error
        raise raised

    monkeypatch.setattr(artifacts, "save_file", failing)
    with pytest.raises(WriteError) as err:
        save_arrays(tmp_path / "a.safetensors", BIG)
    assert str(tmp_path / "a.safetensors") in one_line(err.value)
    assert (tmp_path / "a.safetensors").read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


def test_other_failures_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "save_file", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad dtype")))
    with pytest.raises(ValueError, match="bad dtype"):
        save_arrays(tmp_path / "a.safetensors", BIG)
    assert os.listdir(tmp_path) == []
    assert write_errno(OSError(errno.ENOENT, "x")) is None and write_errno(OSError(errno.ENOSPC, "x")) == errno.ENOSPC


def test_all_or_nothing_keeps_every_previous_output(tmp_path, monkeypatch):
    write_json(tmp_path / "a.json", {"v": 1})
    write_json(tmp_path / "b.json", {"v": 1})
    real = artifacts.save_file

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save_file", full)
    with pytest.raises(WriteError):
        with all_or_nothing():
            write_json(tmp_path / "a.json", {"v": 2})  # written to its temp, not yet renamed
            save_arrays(tmp_path / "c.safetensors", BIG)
            write_json(tmp_path / "b.json", {"v": 2})
    assert [(tmp_path / f).read_text() for f in ("a.json", "b.json")] == ['{\n  "v": 1\n}\n'] * 2
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]
    monkeypatch.setattr(artifacts, "save_file", real)
    with all_or_nothing():
        write_json(tmp_path / "a.json", {"v": 3})
        assert (tmp_path / "a.json").read_text() == '{\n  "v": 1\n}\n'  # renamed at the end only
    assert (tmp_path / "a.json").read_text() == '{\n  "v": 3\n}\n'
