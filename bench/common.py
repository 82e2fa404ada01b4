"""What the bench scripts share: where the corpus is, the device they compare on, and the pair arrays
(the pipeline's own files, or made by the tokenize and pairs stages' package functions)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from bench.data import SHARED, data_dir
from minibert import layout
from minibert.artifacts import load_arrays
from minibert.config import PairsConfig, VocabConfig
from minibert.data.corpus import SPLITS
from minibert.data.pairs import pairs_splits
from minibert.data.shards import workers
from minibert.data.tokenize import tokenize_splits
from minibert.data.vocab import Vocab

DEFAULT_DATA = os.environ.get("MINIBERT_DATA", str(SHARED / "data/wikitext-2"))
DEVICE = torch.device("cpu")  # the issue compares against the book's code on the same CPU


def load_splits(splits: tuple[str, ...], data: str, pairs_dir: Path) -> tuple[dict[str, dict], int, str]:
    """({split: pair arrays}, vocab size, where they came from): the pipeline's files when present,
    else made in a temporary folder by the tokenize and pairs stages' own functions, default params."""
    vocab_file = pairs_dir.parent / layout.TOKENS.name / layout.VOCAB.name
    if all((pairs_dir / f"{s}.safetensors").is_file() for s in splits) and vocab_file.is_file():
        return {s: load_arrays(pairs_dir / f"{s}.safetensors") for s in splits}, len(Vocab.load(vocab_file)), \
            str(pairs_dir)
    raw = data_dir(data)
    with tempfile.TemporaryDirectory(prefix="minibert-bench-pairs-") as tmp:
        vocab, _ = tokenize_splits(raw, Path(tmp) / "tokens", VocabConfig().min_freq, workers(0))
        pairs_splits(Path(tmp) / "tokens", Path(tmp) / "pairs", PairsConfig(), workers(0), SPLITS)
        out = {s: load_arrays(Path(tmp) / "pairs" / f"{s}.safetensors") for s in splits}
    return out, len(vocab), f"made in-process by the tokenize and pairs stages' functions from {raw}"


def micro_batch_settings(text: str, prog: str) -> list[int | str]:
    """`--micro-batches` as the bench scripts take it: comma-separated integers >= 1 or `auto`
    (train.micro_batches' own values), e.g. "auto,4,1"; anything else is one SystemExit line."""
    items = text.split(",")
    if not all(k == "auto" or (k.isdigit() and int(k) >= 1) for k in items):
        raise SystemExit(f"{prog}: --micro-batches {text!r}: use integers >= 1 or auto, e.g. auto,4,1")
    return [k if k == "auto" else int(k) for k in items]
