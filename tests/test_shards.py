"""minibert.data.shards: safetensors written from parts (same bytes as the library), memmap reads,
byte shards that cover every line once, and a pool whose results keep item order."""
from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minibert.data.shards import ByteShard, byte_shards, open_safetensors, pool_map, shard_lines, write_safetensors
from minibert.errors import DataError


def arrays():
    rng = np.random.default_rng(13)
    return {"token_ids": rng.integers(0, 99, (7, 13)).astype(np.int32),
            "mlm_weights": rng.random((7, 3)).astype(np.float32),
            "offsets": np.arange(8, dtype=np.int64) * 37,
            "b_ids": np.arange(5, dtype=np.int32),
            "empty": np.zeros(0, np.int64),
            "flags": np.array([1, 0, 1], np.uint8)}


def chunked(a: np.ndarray, n: int):
    flat = a.reshape(-1)
    return lambda: (flat[i:i + n] for i in range(0, len(flat), n))


@pytest.mark.parametrize("meta", [None, {"vocab_sha256": "ab" * 32}])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_streamed_file_has_the_library_s_bytes(tmp_path, meta, chunk):
    ref = tmp_path / "ref.safetensors"
    save_file(arrays(), str(ref), metadata=meta)
    fields = {k: (v.dtype, v.shape, chunked(v, chunk)) for k, v in arrays().items()}
    write_safetensors(tmp_path / "ours.safetensors", fields, meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == ref.read_bytes()


def test_a_short_part_leaves_no_file(tmp_path):
    a = np.arange(10, dtype=np.int32)
    with pytest.raises(RuntimeError, match="got 36 bytes"):
        write_safetensors(tmp_path / "x.safetensors", {"a": (np.int32, (10,), lambda: [a[:9]])})
    assert list(tmp_path.iterdir()) == []


def test_memmap_read_matches_the_library_and_is_lazy(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(arrays(), str(path), metadata={"k": "v"})
    got, meta = open_safetensors(path)
    want = load_file(str(path))
    assert meta == {"k": "v"} and set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
    assert isinstance(got["token_ids"], np.memmap)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_file_is_one_data_error(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    save_file(arrays(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5] if damage == "truncate" else data[:8] + b"[" + data[9:])
    with pytest.raises(DataError, match="x.safetensors: .*re-run"):
        open_safetensors(path)


@pytest.mark.parametrize("text", [b"", b"one line no newline", b"a\nbb\n\nccc\n" * 13 + b"tail",
                                  "é\nü ß\n".encode() * 29])
@pytest.mark.parametrize("size", [1, 2, 7, 13, 99, 1 << 20])
def test_byte_shards_cover_every_line_exactly_once(tmp_path, text, size):
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    shards = byte_shards(path, size)
    assert shards[0].start == 0 and shards[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    assert "".join(line for s in shards for line in shard_lines(s)) == text.decode()
    assert all(text[s.start - 1:s.start] == b"\n" for s in shards[1:])  # cuts only after a newline


def slow_square(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


def test_pool_keeps_item_order_whatever_finishes_first():
    items = [(i, 0.05 * (5 - i)) for i in range(6)]  # the first items finish last
    assert pool_map(slow_square, items, 2) == pool_map(slow_square, items, 1) == [i * i for i in range(6)]


def test_byte_shard_is_picklable_for_the_pool():
    import pickle
    s = ByteShard("/x", 1, 2)
    assert pickle.loads(pickle.dumps(s)) == s


def mapped_kb(path) -> int:
    """This process's resident kB in the mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_drops_touched_pages_from_rss_and_keeps_values(tmp_path):
    from minibert.data.shards import drop_mapped_pages

    path = tmp_path / "big.safetensors"
    big = {"x": np.arange(1 << 20, dtype=np.int32), "y": np.ones((1 << 18, 3), np.float32)}  # 4 MB + 3 MB
    save_file(big, str(path))
    arrays, _ = open_safetensors(path)
    assert int(arrays["x"].sum()) == int(big["x"].sum()) and float(arrays["y"].sum()) == 3 * (1 << 18)
    assert mapped_kb(path) > 6000  # touched: resident
    drop_mapped_pages(arrays)
    assert mapped_kb(path) < 100
    assert np.array_equal(arrays["x"], big["x"]) and np.array_equal(arrays["y"], big["y"])  # faults back in
