"""Data stages in shards: byte ranges of a text file, a deterministic process pool, and safetensors
files written from parts and read memory-mapped.

Why: the data stages used to hold a whole split in Python lists (~80 bytes of RSS per token). Now a
stage works on one shard per worker at a time, each worker writes its shard's arrays to raw part
files, and the parent concatenates the parts, in shard order, into the split's one safetensors file.
The bytes depend only on the input and the shard boundaries, never on how many workers ran or which
finished first (`pool_map` returns results in submission order).

`write_safetensors` writes exactly what `safetensors.numpy.save_file` writes for the same arrays
(tensors ordered by dtype, widest first, then by name; compact JSON header padded with spaces to a
multiple of 8), so a split that fits one shard has the same bytes as before sharding.
`open_safetensors` maps a file's tensors as copy-on-write `numpy.memmap`s: nothing is read until
touched, and a reader never holds more of the file in anonymous memory than it copies out.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from minibert.artifacts import atomic_path
from minibert.errors import DataError

# safetensors' dtype names, in its enum order: the data section is sorted by this order, reversed.
_DTYPES = [("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("I16", np.int16), ("U16", np.uint16),
           ("F16", np.float16), ("I32", np.int32), ("U32", np.uint32), ("F32", np.float32),
           ("F64", np.float64), ("I64", np.int64), ("U64", np.uint64)]
_NAME = {np.dtype(t): name for name, t in _DTYPES}
_NUMPY = {name: np.dtype(t) for name, t in _DTYPES}
_RANK = {name: i for i, (name, _) in enumerate(_DTYPES)}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def workers(n: int) -> int:
    """Processes for a pool: `n`, or every usable core when 0."""
    if n:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_imap(fn: Callable, items: Sequence, n_workers: int) -> Iterator:
    """`fn(*item) for item in items` on `n_workers` processes, yielded lazily in item order whatever
    the scheduling (so a caller can fold big results one at a time). One worker (or one item) runs
    in-process: no pool to start."""
    if n_workers <= 1 or len(items) <= 1:
        yield from (fn(*item) for item in items)
        return
    # fork: workers inherit the imported modules (spawn would re-import numpy per worker); the data
    # stages start no threads before the pool exists.
    with ProcessPoolExecutor(min(n_workers, len(items)), mp_context=get_context("fork")) as pool:
        yield from pool.map(fn, *zip(*items))


def pool_map(fn: Callable, items: Sequence, n_workers: int) -> list:
    """`list(pool_imap(...))`: results in item order."""
    return list(pool_imap(fn, items, n_workers))


# ---------------------------------------------------------------------------- text shards


@dataclass(frozen=True)
class ByteShard:
    """Lines of `path` whose first byte lies in [start, end)."""
    path: str
    start: int
    end: int


def byte_shards(path: str | Path, shard_bytes: int) -> list[ByteShard]:
    """Cut a file near every `shard_bytes` multiple, each cut moved past the next newline, so every
    line lies whole in exactly one shard. A function of the file's bytes and `shard_bytes` only."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for guess in range(shard_bytes, size, shard_bytes):
            if guess <= cuts[-1]:
                continue
            f.seek(guess - 1)
            f.readline()  # to the end of the line holding byte guess-1
            if (pos := f.tell()) < size:
                cuts.append(pos)
    cuts.append(size)
    return [ByteShard(str(path), a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [ByteShard(str(path), 0, 0)]


def shard_lines(shard: ByteShard) -> Iterator[str]:
    """The shard's lines, decoded as UTF-8 (newline kept)."""
    with open(shard.path, "rb") as f:
        f.seek(shard.start)
        pos = shard.start
        while pos < shard.end and (line := f.readline()):
            pos += len(line)
            yield line.decode("utf-8")


# ---------------------------------------------------------------------------- safetensors


def _header(fields: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list]:
    order = sorted(fields, key=lambda k: (-_RANK[_NAME[np.dtype(fields[k][0])]], k))
    head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in order:
        dtype, shape = np.dtype(fields[k][0]), tuple(int(s) for s in fields[k][1])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        head[k] = {"dtype": _NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, order


def write_safetensors(path: str | Path, fields: dict[str, tuple[np.dtype, tuple[int, ...], Callable[[], Iterable]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: `fields[name] = (dtype, shape, chunks)` where
    `chunks()` yields arrays (or bytes) whose concatenation is the tensor in C order. At most one
    metadata entry (as `artifacts.save_arrays`). Written to a temp file, renamed when complete."""
    if metadata and len(metadata) > 1:
        raise ValueError("write_safetensors takes at most one metadata entry (more would make the bytes vary)")
    head, order = _header({k: v[:2] for k, v in fields.items()}, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for k in order:
            dtype, shape, chunks = fields[k]
            want, got = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, 0
            for chunk in chunks():
                buf = chunk if isinstance(chunk, bytes) else np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                f.write(buf)
                got += len(buf)
            if got != want:  # a bug, not bad input: never leave a file whose header lies
                raise RuntimeError(f"{path}: tensor {k} got {got} bytes, its header says {want}")


def open_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as a copy-on-write memmap, and the metadata.

    Pages are read on first touch and stay reclaimable page cache; writes (none expected) would
    stay private to the process."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise DataError(f"{path}: not a safetensors file (bad header length); re-run the stage that writes it")
        try:
            head = json.loads(f.read(n))
        except ValueError:
            raise DataError(f"{path}: not a safetensors file (bad header); re-run the stage that writes it") from None
    meta = head.pop("__metadata__", None) or {}
    arrays = {}
    for k, info in head.items():
        lo, hi = info["data_offsets"]
        dtype, shape = _NUMPY.get(info["dtype"]), tuple(info["shape"])
        if dtype is None or hi - lo != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or 8 + n + hi > size:
            raise DataError(f"{path}: tensor {k} does not fit the file (truncated?); re-run the stage that writes it")
        if hi == lo:  # mmap cannot map zero bytes
            arrays[k] = np.zeros(shape, dtype)
        else:
            arrays[k] = np.memmap(path, dtype=dtype, mode="c", offset=8 + n + lo, shape=shape)
    return arrays, meta



def drop_mapped_pages(arrays: dict[str, np.ndarray]) -> None:
    """Drop the pages of `open_safetensors` maps from this process's RSS; they stay in the page
    cache and fault back in (minor faults) when touched again. Training calls it between steps:
    random batches would otherwise leave the whole mapped file counted in RSS (the kernel maps
    64 KiB around every touched row)."""
    for arr in arrays.values():
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)
