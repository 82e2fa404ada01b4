"""WikiText-2 and WikiText-103 on disk: pins, verification, safe extraction, and the book's paragraph rule
(fetching from the mirrors: `minibert.data.fetch`).

`fetch.fetch_wikitext(cfg, dest, local)` fills `dest` with exactly `wiki.{train,valid,test}.tokens` of the
corpus `cfg.corpus` names (`PINS`: each corpus's pinned checksums; the user's own text is
`minibert.data.text`).
Sources, in order: `local` alone when given (a zip, a folder holding the three `.tokens` files,
or a folder holding the three Hugging Face parquet files) — no network at all; otherwise the
corpus's mirrors in `cfg.mirrors`: its archive `zip_url`, then its Hugging Face parquet copy `parquet_urls`.

Verification is by content, not by archive, so any mirror that holds the same text passes:

* exact: the hash of each file's bytes must equal the pinned one: sha256 for WikiText-2
  (`SHA256`), the published SHA-1s for WikiText-103 (`SHA1_103`, GluonNLP's dataset records,
  whose WikiText-2 SHA-1s match the official WikiText-2 files too).
  The zip and `.tokens` folders must match exactly.
* parquet: each row of the `text` column is one original line (Hugging Face keeps a line
  like `" = A = \\n"` as is and stores the blank line `" \\n"` as ""). Every line of the official files
  is in one canonical form — `" " + " ".join(tokens) + " \\n"`, a blank line `" \\n"` — so
  each row is rewritten in that form from its tokens (split on ASCII whitespace, Python
  `bytes.split()`); an empty or null row becomes `" \\n"`. For the Hugging Face layout, or
  any mirror that only re-spaced lines, this gives the official bytes and the exact hash
  passes. If it still differs (a mirror that dropped blank lines), `TOKENS_SHA256[split]`
  is checked instead: the sha256 of, for every line holding at least one token, its tokens
  joined by one space plus `"\\n"`, blank lines skipped. That pins every token and line
  (paragraph) boundary; as the lines are canonical, `read_paragraphs` returns the same
  result. The source description then says "token-level match". (WikiText-103 has no
  token-level pins: its files cannot be fetched here to compute them, so only exact passes.)

Archives are extracted member by member after refusing the whole archive if any member has
an absolute path, a `..` part, is a symlink, is over `MAX_MEMBER_BYTES` or inflates more than
`MAX_RATIO` times. Everything is built in a temp folder and renamed into place only after it
verifies (`atomic_dir`): a failure leaves no output folder behind.
"""
from __future__ import annotations

import hashlib
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from minibert.artifacts import sha256_file
from minibert.errors import DataError

SPLITS = ("train", "valid", "test")

SHA256 = {  # the official wikitext-2-v1 files
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
TOKENS_SHA256 = {  # `tokens_sha256` of the same files (see the module docstring)
    "train": "eb185bf3702ea74fe96ce9d478b382253bd911f4a4c55d5a547acf311e7aece9",
    "valid": "6494b600c71f9fb83b4eb389b661035f7ff67d1c628bfb17119300576cfcaa67",
    "test": "9c068e2fd7937b38b734ed5fe0439c5265f39091bce7c214f8a76e08026051ae",
}
SHA1_103 = {  # the official wikitext-103-v1 files (published SHA-1s)
    "train": "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
    "valid": "c326ac59dc587676d58c422eb8a03e119582f92b",
    "test": "8a5befc548865cec54ed4273cf87dbbad60d1e47",
}
MAX_MEMBER_BYTES = 1 << 30  # the real files are 1-540 MB; anything near 1 GiB is neither WikiText
MAX_RATIO = 100  # text deflates ~4x; a zip bomb inflates thousands of times


@dataclass(frozen=True)
class Pins:
    """What a corpus's files must hash to: `checksums[split] = (hashlib algorithm, hex digest)`;
    `tokens[split]`: the token-level sha256 a re-spaced mirror may match instead (None: exact only)."""
    name: str
    checksums: dict[str, tuple[str, str]]
    tokens: dict[str, str] | None = None

    @property
    def hint(self) -> str:
        return f"set MINIBERT_DATA to a local {self.name}-v1.zip or a folder holding wiki.{{train,valid,test}}.tokens"


PINS = {
    "wikitext-2": Pins("wikitext-2", {k: ("sha256", v) for k, v in SHA256.items()}, TOKENS_SHA256),
    "wikitext-103": Pins("wikitext-103", {k: ("sha1", v) for k, v in SHA1_103.items()}),
}
HINT = PINS["wikitext-2"].hint


def split_file(raw_dir: str | Path, split: str) -> Path:
    """`data/raw/corpus/wiki.<split>.tokens`."""
    return Path(raw_dir) / f"wiki.{split}.tokens"


def read_paragraphs(path: str | Path) -> list[list[list[str]]]:
    """Paragraphs → sentences → tokens, by the d2l book's rule exactly.

    A line is a paragraph if it holds at least two ' . '-separated sentences; it is
    stripped, lower-cased and split on ' . '; a sentence's tokens are its whitespace split.
    (The separating '.' tokens are dropped, the last sentence keeps its final '.'.)
    """
    with open(path, encoding="utf-8") as f:
        return [p for line in f if (p := paragraph(line)) is not None]


def paragraph(line: str) -> list[list[str]] | None:
    """One line by the book's rule (`read_paragraphs`): its sentences' tokens, or None."""
    if len(line.split(" . ")) < 2:
        return None
    return [s.split() for s in line.strip().lower().split(" . ")]


# ---------------------------------------------------------------------------- verification


def tokens_sha256(path: str | Path) -> str:
    """sha256 of the whitespace-normalised lines (module docstring): blind to spacing only."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for line in f:
            if toks := line.split():
                h.update(b" ".join(toks) + b"\n")
    return h.hexdigest()


def verify_files(folder: str | Path, token_level_ok: bool = False, origin: str | None = None,
                 pins: Pins = PINS["wikitext-2"]) -> bool:
    """Check the three files by content against `pins`; True if every file is byte-exact.

    With `token_level_ok`, a file whose bytes differ may still pass on `pins.tokens`.
    `origin` names the source in errors (the folder may be a temp one).
    """
    origin, exact = origin or str(folder), True
    for path in (split_file(folder, split) for split in SPLITS):  # all present before any hashing
        if not path.is_file():
            raise DataError(f"{origin}: {path.name} is missing; the source must hold wiki.{{train,valid,test}}.tokens")
        if path.stat().st_size == 0:
            raise DataError(f"{origin}: {path.name} is empty; use an intact copy of {pins.name}")
    for split in SPLITS:
        path = split_file(folder, split)
        algo, want = pins.checksums[split]
        got = hash_file(path, algo)
        if got == want:
            continue
        if token_level_ok and pins.tokens and tokens_sha256(path) == pins.tokens[split]:
            exact = False
            continue
        raise DataError(f"{origin}: {path.name} has {algo} {got}, expected {want}; "
                        f"the file is corrupt or not {pins.name} v1 (tokenized)")
    return exact


def hash_file(path: str | Path, algo: str) -> str:
    if algo == "sha256":
        return sha256_file(path)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- zip


def unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a '..' path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symlink"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"{info.file_size} bytes uncompressed (limit {MAX_MEMBER_BYTES})"
    if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > (1 << 20):
        return f"a compression ratio over {MAX_RATIO} (zip bomb?)"
    return None


def safe_extract(zip_path: str | Path, dest: str | Path, origin: str | None = None,
                 name: str = "wikitext-2") -> None:
    """Extract `*/wiki.<split>.tokens` from the zip flat into `dest`, refusing unsafe archives."""
    zip_path, dest = Path(zip_path), Path(dest)
    origin, intact = origin or str(zip_path), f"use an intact {name}-v1.zip"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            for info in infos:
                if reason := unsafe_reason(info):
                    raise DataError(f"{origin}: member {info.filename!r} is {reason}; refusing the archive, {intact}")
            members = {}
            for want in (split_file("", split).name for split in SPLITS):
                found = [i for i in infos if not i.is_dir() and PurePosixPath(i.filename).name == want]
                if len(found) != 1:
                    raise DataError(f"{origin}: holds {len(found)} members named {want} (need exactly 1); {intact}")
                members[want] = found[0]
            for want, info in members.items():
                _copy_member(zf, info, dest / want)
    except zipfile.BadZipFile as e:
        raise DataError(f"{origin}: not a valid zip archive ({e}); {intact}") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{origin}: truncated or corrupt zip archive ({e}); {intact}") from None


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path) -> None:
    # Count real bytes: the header's file_size is the archive's claim, not a promise.
    written = 0
    with zf.open(info) as src, open(out, "wb") as dst:
        while block := src.read(1 << 20):
            written += len(block)
            if written > MAX_MEMBER_BYTES:
                raise DataError(f"member {info.filename!r} inflates past {MAX_MEMBER_BYTES} bytes; refusing it")
            dst.write(block)


# ---------------------------------------------------------------------------- parquet


def rebuild_from_parquet(parquet: dict[str, Path | list[Path]], dest: str | Path, origin: str | None = None) -> None:
    """Write `wiki.<split>.tokens` from each split's parquet `text` rows (one row per line); a split
    may come in several files (WikiText-103's train), read in the given order, in row batches."""
    import pyarrow.parquet as pq  # only this source needs it

    for split in SPLITS:
        paths = parquet[split] if isinstance(parquet[split], (list, tuple)) else [parquet[split]]
        with open(split_file(dest, split), "wb") as f:
            for path in map(Path, paths):
                where = f"{origin or path.parent}: {path.name}"
                try:
                    pf = pq.ParquetFile(path)
                    if "text" not in pf.schema_arrow.names:
                        raise DataError(f"{where}: no 'text' column (has {pf.schema_arrow.names}); "
                                        "expected the Hugging Face wikitext layout")
                    for batch in pf.iter_batches(columns=["text"], batch_size=1 << 16):
                        for row in batch.column(0).to_pylist():
                            toks = row.encode("utf-8").split() if row else []
                            f.write(b" " + b" ".join(toks) + b" \n" if toks else b" \n")
                except DataError:
                    raise
                except Exception as e:  # pyarrow raises several unrelated types for a bad file
                    raise DataError(f"{where}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def parquet_in(folder: Path) -> dict[str, list[Path]] | None:
    """Each split's parquet files in `folder` (`train-00000-of-00002.parquet`, ...), in name order."""
    names = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
    found = {}
    for split, prefixes in names.items():
        hits = sorted({p for pre in prefixes for p in folder.glob(f"{pre}*.parquet")})
        if not hits:
            return None
        found[split] = hits
    return found
