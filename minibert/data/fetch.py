"""Fetching a WikiText corpus: from `MINIBERT_DATA` (a zip or folder) or the corpus's mirrors
(`data.mirrors`: its archive, then its parquet copy), each source verified by `minibert.data.corpus`
(pins, safe extraction, parquet rebuild) before the folder appears. `fetch_wikitext` is the download
stage's work."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from minibert.artifacts import atomic_dir
from minibert.config import DataConfig, Mirror
from minibert.data.corpus import (
    MAX_MEMBER_BYTES,
    PINS,
    SPLITS,
    Pins,
    parquet_in,
    rebuild_from_parquet,
    safe_extract,
    split_file,
    verify_files,
)
from minibert.errors import DataError

# ---------------------------------------------------------------------------- http


@contextmanager
def _progress(url: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking bytes-so-far: a rich bar on a terminal, a line every ~10% otherwise."""
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:  # stops (restores the cursor) even on errors
            task = bar.add_task(f"download {url.rsplit('/', 1)[-1]}", total=total)
            yield lambda done: bar.update(task, completed=done)
        return
    last = [-1.0, time.monotonic()]

    def plain(done: int) -> None:
        frac, now = done / total if total else 0.0, time.monotonic()
        if (total and frac - last[0] >= 0.1) or now - last[1] >= 5 or (total and done >= total):
            last[0], last[1] = frac, now
            size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else f"{done / 2**20:.1f} MiB"
            print(f"download: {url}: {size}", file=sys.stderr, flush=True)
    yield plain


def download(url: str, path: str | Path, timeout: float, retries: int,
             max_bytes: int = MAX_MEMBER_BYTES) -> None:
    """Stream `url` to `path`; retry network errors and 5xx `retries` times; DataError at the end."""
    path = Path(path)
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(path, "wb") as out:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                with _progress(url, total) as report:
                    while block := resp.read(1 << 20):
                        done += len(block)
                        if done > max_bytes:
                            raise DataError(f"{url}: larger than {max_bytes} bytes; not a WikiText archive")
                        out.write(block)
                        report(done)
                if total is not None and done != total:
                    raise ConnectionError(f"got {done} of {total} bytes")
            return
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code} {e.reason}"
            if e.code < 500 and e.code != 429:  # a missing file stays missing
                break
        except (urllib.error.URLError, OSError, ValueError) as e:
            error = str(getattr(e, "reason", None) or e) or type(e).__name__
    tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
    raise DataError(f"{url}: {' '.join(error.split())} ({tries})")


# ---------------------------------------------------------------------------- sources


def mirrors(cfg: DataConfig) -> tuple[str, dict[str, list[str]]]:
    """The zip URL and the per-split parquet URLs (lists) of the corpus `cfg.corpus` names; none when
    `data.mirrors` has no entry for it."""
    mirror = cfg.mirrors.get(cfg.corpus, Mirror())
    return mirror.zip_url, {k: [v] if isinstance(v, str) else list(v) for k, v in mirror.parquet_urls.items()}


def _from_local(local: Path, out: Path, pins: Pins) -> str:
    origin = f"MINIBERT_DATA={local}"
    if not local.exists():
        raise DataError(f"{origin}: no such file or folder; {pins.hint}")
    if local.is_file():
        if not zipfile.is_zipfile(local):
            raise DataError(f"{origin}: not a zip archive; {pins.hint}")
        safe_extract(local, out, origin, pins.name)
        verify_files(out, origin=origin, pins=pins)
        return f"local zip {local}"
    if not split_file(local, "train").exists() and (parquet := parquet_in(local)):
        rebuild_from_parquet(parquet, out, origin)
        exact = verify_files(out, token_level_ok=True, origin=origin, pins=pins)
        return f"local parquet {local}" + ("" if exact else " (token-level match)")
    for split in SPLITS:
        if split_file(local, split).is_file():
            shutil.copyfile(split_file(local, split), split_file(out, split))
    verify_files(out, origin=origin, pins=pins)
    return f"local folder {local}"


def _from_zip_url(cfg: DataConfig, work: Path, out: Path, pins: Pins) -> str:
    url = mirrors(cfg)[0]
    archive = work / f"{pins.name}-v1.zip"
    download(url, archive, cfg.timeout_s, cfg.retries)
    safe_extract(archive, out, url, pins.name)
    verify_files(out, origin=url, pins=pins)
    return url


def _from_parquet_urls(cfg: DataConfig, work: Path, out: Path, pins: Pins) -> str:
    urls = mirrors(cfg)[1]
    parquet = {split: [work / f"{split}-{i}-{u.rsplit('/', 1)[-1]}" for i, u in enumerate(urls[split])]
               for split in SPLITS}
    for split in SPLITS:
        for url, path in zip(urls[split], parquet[split]):
            download(url, path, cfg.timeout_s, cfg.retries)
    where = urls["train"][0].rsplit("/", 1)[0] + "/"
    rebuild_from_parquet(parquet, out, f"parquet {where}")
    exact = verify_files(out, token_level_ok=True, origin=f"parquet {where}", pins=pins)
    return f"parquet {where}" + ("" if exact else " (token-level match)")


def fetch_wikitext(cfg: DataConfig, dest: str | Path, local: str | Path | None = None,
                   checksums: dict[str, tuple[str, str]] | None = None) -> str:
    """Fill `dest` with exactly the three verified files of `cfg.corpus`; return a one-line note of
    the source.

    `checksums` (`{split: (hashlib algorithm, hex digest)}`) replaces the corpus's pinned table, with
    no token-level fallback. It exists for tests that build archives in the real layout (a real
    WikiText-103 cannot be downloaded there); the stage never passes it, so real data always meets
    the pins in `PINS`."""
    dest = Path(dest)
    pins = PINS[cfg.corpus]
    if checksums is not None:
        pins = Pins(pins.name, dict(checksums))
    with atomic_dir(dest) as out:
        if local is not None:
            return _from_local(Path(local), out, pins)
        zip_url, parquet_urls = mirrors(cfg)
        sources = [("zip_url", _from_zip_url)] if zip_url else []
        if parquet_urls:
            sources.append(("parquet_urls", _from_parquet_urls))
        failures = []
        for name, fetch in sources:
            for stale in out.iterdir():  # a failed source's half-written files
                stale.unlink()
            with tempfile.TemporaryDirectory(prefix=f".{dest.name}.dl.", dir=dest.parent) as work:
                try:
                    return fetch(cfg, Path(work), out, pins)
                except DataError as e:
                    failures.append(f"{name}: {e}")
        tried = "; ".join(failures) or f"none configured (no zip or parquet URLs for {pins.name} in data)"
        raise DataError(f"every source failed: {tried}; {pins.hint}")
