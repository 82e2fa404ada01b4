"""Writing artifacts safely: temp file or folder first, then an atomic rename.

A stage that fails half-way leaves no partial output behind; readers never see a torn file. A write
that fails for want of room or rights (no space, quota, read-only filesystem, permission) becomes one
`WriteError` line naming the output, the free space there and, when known, the room it needed; the
temp is removed and the previous output stays as it was. Inside `all_or_nothing()` the renames wait
until the whole block has written its temps, so a failure anywhere leaves every previous output.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load_file, save_file

from minibert.errors import WriteError

# What a full or locked-down filesystem raises. EACCES/EPERM only count when our own create/rename
# fails: inside a caller's block they could come from reading an input.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
NO_RIGHTS = {errno.EACCES, errno.EPERM}
_HINT = {errno.ENOSPC: "free some space or point the output elsewhere",
         errno.EDQUOT: "the disk quota is used up; free some space or point the output elsewhere",
         errno.EROFS: "the filesystem is read-only; point the output elsewhere",
         errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions"}
_staged: list[tuple[Path, Path]] | None = None  # (temp, final) renames waiting for all_or_nothing's end


def write_errno(e: BaseException, codes: set[int] = NO_ROOM | NO_RIGHTS) -> int | None:
    """The errno of a failed write in `codes`: an OSError's own, or the `(os error N)` that
    safetensors' Rust writer puts in its SafetensorError message; None for any other failure."""
    code = e.errno if isinstance(e, OSError) else getattr(e, "code", None) if isinstance(e, WriteError) else None
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(m.group(1))
    return code if code in codes else None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_error(path: str | Path, e: BaseException, need: int | None = None) -> WriteError:
    """One line: what failed where, the free space there, the room needed (when known), the fix."""
    code = write_errno(e) or errno.EIO
    need = need if need is not None else getattr(e, "need", None)
    needed = f", {human_bytes(need)} needed" if need is not None else ""
    err = WriteError(f"cannot write {path}: {os.strerror(code)} ({human_bytes(free_bytes(path))} free there"
                     f"{needed}); {_HINT.get(code, 'check the disk')}")
    err.code, err.need = code, need
    return err


@contextmanager
def write_errors(path: str | Path, need: int | None = None, codes: set[int] = NO_ROOM | NO_RIGHTS) -> Iterator[None]:
    """Turn a no-room/no-rights failure inside the block into `write_error(path, ...)`; a WriteError
    of a write nested inside (a file in a temp folder) is named after this, the outer, output."""
    try:
        yield
    except Exception as e:
        if write_errno(e, codes) is None:
            raise
        raise write_error(path, e, need) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """`atomic_path` outputs written inside rename into place only once the block completes; on any
    error every temp is removed and every previous output is left as it was."""
    global _staged
    outer, _staged = _staged, []
    mine = _staged
    try:
        yield
        _staged = outer
        for tmp, path in mine:
            with write_errors(path):
                os.replace(tmp, path)  # same folder: no new room needed
    finally:
        _staged = outer
        for tmp, _ in mine:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error delete it.
    `need`: the bytes the write takes, for the message when there is no room."""
    path = Path(path)
    with write_errors(path, need):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    staged = False
    try:
        with write_errors(path, need, NO_ROOM):
            yield tmp
            # mkstemp makes 0600 (and safetensors' writer recreates the file 0600): outputs should read
            # like any other file
            os.chmod(tmp, 0o666 & ~_umask())
        if _staged is not None:
            _staged.append((tmp, path))
            staged = True
        else:
            with write_errors(path, need):
                os.replace(tmp, path)
    finally:
        if not staged:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` whole (the old folder
    is moved aside first and deleted only once the new one is in place)."""
    path = Path(path)
    with write_errors(path, need):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        with write_errors(path, need, NO_ROOM):
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
        with write_errors(path, need):
            if path.exists():
                old = path.with_name(f".{path.name}.{os.getpid()}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)  # put the previous output back
                    old = None
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON (stable bytes for DVC), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """safetensors: no pickle, loads in milliseconds, same bytes for the same arrays.

    At most one metadata entry: safetensors writes metadata from a hash map, so the header's key
    order (and the file's bytes) would vary from run to run with two or more."""
    if metadata and len(metadata) > 1:
        raise ValueError("save_arrays takes at most one metadata entry (more would make the bytes vary)")
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
