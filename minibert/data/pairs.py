"""NSP sentence pairs and static MLM masks, built with whole-array numpy (no per-example objects).

Output per split (fixed-shape arrays; N pairs, T = max_len, P = round(mask_rate * max_len)):
  token_ids (N, T) int32   `<cls> a <sep> b <sep>` then `<pad>`
  segments (N, T) int32    0 for `<cls> a <sep>`, 1 for `b <sep>`, 0 on padding
  valid_lens (N,) int32    real length len(a) + len(b) + 3
  pred_positions (N, P)    positions chosen for MLM, ascending; 0 on unused slots
  mlm_weights (N, P) f32   1 for a real slot, 0 for an unused one
  mlm_labels (N, P)        original token id at each real slot; 0 (`<pad>`) on unused ones
  nsp_labels (N,) int32    1: b really follows a; 0: b is a random sentence

Every random choice comes from the one passed-in `numpy.random.Generator`, drawn in a fixed order
(paragraph shuffle, NSP coin, random sentence, mask choice, replacement), so the same seed gives
the same bytes on every machine.

Shards (the pairs stage): a split is cut into runs of whole paragraphs of about `shard_tokens`
tokens (`paragraph_shards`, a function of the token file and `shard_tokens` only), and `make_pairs`
runs on each shard with its own generator (`shard_rng`: shard 0 takes the seed itself, so a split
that fits one shard — every WikiText-2 split at the default — has the unsharded bytes). So the
paragraph shuffle and the NSP negatives are drawn *within a shard*, not from the whole corpus as in
the book: a negative is a random sentence of a random paragraph of the same ~`shard_tokens`-token
run. Training order is unaffected (the loop draws batches across the whole file). The parent
concatenates the shards' parts in shard order, so the bytes do not depend on the worker count.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from minibert.artifacts import atomic_dir
from minibert.config import PairsConfig
from minibert.data.shards import open_safetensors, pool_map, write_safetensors
from minibert.data.vocab import CLS, MASK, PAD, SEP, SPECIALS, Vocab
from minibert.errors import DataError

FIELDS = ("token_ids", "segments", "valid_lens", "pred_positions", "mlm_weights", "mlm_labels", "nsp_labels")


def candidate_pairs(paragraph_offsets: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Index of sentence `a` for every adjacent (a, a+1) pair, paragraphs taken in `order`."""
    starts = paragraph_offsets[order]
    counts = np.maximum(paragraph_offsets[order + 1] - starts - 1, 0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + np.arange(counts.sum()) - first


def choose_next(a_idx: np.ndarray, paragraph_offsets: np.ndarray, rng: np.random.Generator):
    """The book's NSP rule: keep the true next sentence with probability 0.5, else a random
    sentence of a random paragraph (which may, rarely, be the true one: the label stays 0 as in d2l)."""
    n, n_para = len(a_idx), len(paragraph_offsets) - 1
    is_next = rng.random(n) < 0.5
    para = rng.integers(0, n_para, n)
    n_sent = paragraph_offsets[para + 1] - paragraph_offsets[para]
    rand_sent = paragraph_offsets[para] + rng.integers(0, n_sent)
    return np.where(is_next, a_idx + 1, rand_sent), is_next.astype(np.int32)


def assemble(ids, sentence_offsets, a_idx, b_idx, max_len: int):
    """Lay out `<cls> a <sep> b <sep> <pad>...` for every pair at once."""
    la = (sentence_offsets[a_idx + 1] - sentence_offsets[a_idx])[:, None]  # (N, 1)
    lb = (sentence_offsets[b_idx + 1] - sentence_offsets[b_idx])[:, None]  # (N, 1)
    col = np.arange(max_len)[None, :]                                       # (1, T)
    in_a = (col >= 1) & (col <= la)
    in_b = (col >= la + 2) & (col <= la + lb + 1)
    src = np.where(in_a, sentence_offsets[a_idx][:, None] + col - 1,
                   sentence_offsets[b_idx][:, None] + col - la - 2)         # (N, T) index into ids
    src = np.where(in_a | in_b, src, 0)
    tokens = np.where(in_a | in_b, ids[src], PAD)
    tokens[:, 0] = CLS
    tokens[(col == la + 1) | (col == la + lb + 2)] = SEP
    segments = ((col >= la + 2) & (col <= la + lb + 2)).astype(np.int32)
    valid_lens = (la + lb + 3)[:, 0]
    return tokens.astype(np.int32), segments, valid_lens.astype(np.int32), in_a | in_b


def mask_tokens(tokens, valid_lens, candidates, mask_rate: float, max_preds: int, vocab_size: int,
                rng: np.random.Generator):
    """Choose max(1, round(mask_rate * len)) positions among real tokens (never `<cls>`/`<sep>`; at most
    the row's candidates, which only a rate far above the book's 15 % reaches) into `max_preds` slots, and
    corrupt them by BERT's 80/10/10 rule. Only 80 % become `<mask>` because `<mask>` never occurs at
    fine-tuning time; 10 % stay unchanged so the model must keep a good representation of the
    observed token too; 10 % become a random token so it cannot trust any input word blindly.
    Random tokens are drawn from the ordinary words only: a stray `<cls>`/`<sep>`/`<pad>` in the
    input would corrupt the sentence structure rather than a word. The training loop's dynamic masks
    (minibert/data/masking.py) are drawn here too."""
    n, t = tokens.shape
    p = max_preds
    num_preds = np.maximum(1, np.rint(valid_lens * mask_rate)).astype(np.int64)  # (N,), round-half-even like Python
    num_preds = np.minimum(num_preds, candidates.sum(1))  # never a special: a row may get no slot
    keys = rng.random((n, t))
    keys[~candidates] = 2.0                                           # never pick a non-candidate
    chosen = np.argsort(keys, axis=1, kind="stable")[:, :p]           # (N, P) random candidates
    used = np.arange(p)[None, :] < num_preds[:, None]                 # (N, P) real slots
    positions = np.sort(np.where(used, chosen, t), axis=1)            # real slots first, ascending
    positions = np.where(used, positions, 0)
    rows = np.arange(n)[:, None]
    labels = np.where(used, tokens[rows, positions], PAD)
    u = rng.random((n, p))
    random_tok = rng.integers(len(SPECIALS), vocab_size, (n, p))
    replaced = np.where(u < 0.8, MASK, np.where(u < 0.9, labels, random_tok))
    corrupted = tokens.copy()
    corrupted[rows, positions] = np.where(used, replaced, tokens[rows, positions])
    return corrupted, positions.astype(np.int32), used.astype(np.float32), labels.astype(np.int32)


def make_pairs(split: dict[str, np.ndarray], cfg: PairsConfig, vocab_size: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """NSP pairs with static MLM masks for one encoded split (see `minibert.data.vocab.encode_paragraphs`)."""
    ids, sent_off, para_off = split["ids"], split["sentence_offsets"], split["paragraph_offsets"]
    order = rng.permutation(len(para_off) - 1)                        # the book shuffles paragraphs
    a_idx = candidate_pairs(para_off, order)
    b_idx, nsp = choose_next(a_idx, para_off, rng)
    lengths = np.diff(sent_off)
    keep = lengths[a_idx] + lengths[b_idx] + 3 <= cfg.max_len        # the book drops over-long pairs
    a_idx, b_idx, nsp = a_idx[keep], b_idx[keep], nsp[keep]
    tokens, segments, valid_lens, candidates = assemble(ids, sent_off, a_idx, b_idx, cfg.max_len)
    tokens, positions, weights, labels = mask_tokens(tokens, valid_lens, candidates, cfg.mask_rate, cfg.max_preds,
                                                     vocab_size, rng)
    return {"token_ids": tokens, "segments": segments, "valid_lens": valid_lens, "pred_positions": positions,
            "mlm_weights": weights, "mlm_labels": labels, "nsp_labels": nsp}


def pair_stats(pairs: dict[str, np.ndarray]) -> dict[str, float]:
    """Count, NSP positive rate, mean length and mean number of predictions of one split."""
    n = len(pairs["nsp_labels"])
    return {
        "pairs": n,
        "nsp_positive_rate": round(float(pairs["nsp_labels"].mean()), 6) if n else 0.0,
        "mean_len": round(float(pairs["valid_lens"].mean()), 4) if n else 0.0,
        "mean_preds": round(float(pairs["mlm_weights"].sum(1).mean()), 4) if n else 0.0,
    }


# ---------------------------------------------------------------------------- shards


def paragraph_shards(sentence_offsets: np.ndarray, paragraph_offsets: np.ndarray,
                     shard_tokens: int) -> list[tuple[int, int]]:
    """Paragraph ranges [lo, hi): shard k holds the paragraphs whose first token lies in
    [k * shard_tokens, (k + 1) * shard_tokens) (empty ranges dropped; one range for an empty split)."""
    starts = np.asarray(sentence_offsets[np.asarray(paragraph_offsets[:-1])]) // shard_tokens  # (P,)
    cuts = np.flatnonzero(np.diff(starts)) + 1
    bounds = [0, *cuts.tolist(), len(starts)]
    return list(zip(bounds, bounds[1:])) or [(0, 0)]


def shard_rng(seed: int, shard: int) -> np.random.Generator:
    """Shard 0 draws from `seed` itself (a one-shard split keeps its unsharded bytes); shard k > 0
    from the seed's k-th spawned child, a stream independent of every other shard's."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(shard,)) if shard else seed)


def pairs_shard(tokens_path: str, lo: int, hi: int, cfg: PairsConfig, vocab_size: int, seed: int,
                shard: int, prefix: str) -> dict[str, int]:
    """`make_pairs` on paragraphs [lo, hi) of a memory-mapped token file; writes each field raw to
    `<prefix>.<field>`; returns the sums `pair_stats` needs."""
    arrays, _ = open_safetensors(tokens_path)
    para = np.asarray(arrays["paragraph_offsets"][lo:hi + 1])
    sent = np.asarray(arrays["sentence_offsets"][para[0]:para[-1] + 1])
    split = {"ids": np.array(arrays["ids"][sent[0]:sent[-1]]),  # the shard's tokens, copied out of the map
             "sentence_offsets": sent - sent[0], "paragraph_offsets": para - para[0]}
    pairs = make_pairs(split, cfg, vocab_size, shard_rng(seed, shard))
    for k, v in pairs.items():
        with open(f"{prefix}.{k}", "wb") as f:
            f.write(np.ascontiguousarray(v).data)  # not tofile: its "N requested and 0 written" has no errno
    return {"pairs": len(pairs["nsp_labels"]), "nsp_positive": int(pairs["nsp_labels"].sum()),
            "len": int(pairs["valid_lens"].sum()), "preds": int(np.count_nonzero(pairs["mlm_weights"]))}


def write_pairs(path: str | Path, prefixes: list[str], n: int, cfg: PairsConfig, vocab_sha256: str) -> None:
    """Concatenate the shards' parts into one pairs file (the layout in the module docstring)."""
    t, p = cfg.max_len, cfg.max_preds
    shapes = {"token_ids": (n, t), "segments": (n, t), "valid_lens": (n,), "pred_positions": (n, p),
              "mlm_weights": (n, p), "mlm_labels": (n, p), "nsp_labels": (n,)}
    fields = {k: (np.float32 if k == "mlm_weights" else np.int32, shape,
                  lambda k=k: (Path(f"{q}.{k}").read_bytes() for q in prefixes)) for k, shape in shapes.items()}
    write_safetensors(path, fields, {"vocab_sha256": vocab_sha256})


def sums_stats(sums: list[dict[str, int]]) -> dict[str, float]:
    """`pair_stats` of the concatenated shards, from their sums."""
    total = {k: sum(s[k] for s in sums) for k in ("pairs", "nsp_positive", "len", "preds")}
    n = total["pairs"]
    return {
        "pairs": n,
        "nsp_positive_rate": round(total["nsp_positive"] / n, 6) if n else 0.0,
        "mean_len": round(total["len"] / n, 4) if n else 0.0,
        "mean_preds": round(total["preds"] / n, 4) if n else 0.0,
    }


def load_pairs(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The pair arrays of one split, memory-mapped (copy-on-write: read on first touch, so a
    training step pages in only its batch's rows), and the safetensors metadata (`vocab_sha256`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found; run `dvc repro pairs` first")
    try:
        arrays, meta = open_safetensors(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"{path}: unreadable pairs file ({type(e).__name__}); re-run `dvc repro pairs`") from None
    missing = [k for k in FIELDS if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}; re-run `dvc repro pairs`")
    return arrays, meta


def pairs_splits(tokens: Path, out: Path, cfg: PairsConfig, n_workers: int,
                 splits: tuple[str, ...]) -> tuple[dict[str, float], dict[str, int]]:
    """The pairs stage's work: the pairs of `splits` from the tokenize stage's folder `tokens` into the
    folder `out` (written whole or not at all); (pair stats `{split}_{key}`, shards per split).
    `splits` is passed in (corpus.SPLITS) so that this module, which pretrain imports, needs no corpus code."""
    vocab = Vocab.load(tokens / "vocab.txt")
    jobs = []
    with atomic_dir(out) as tmp:
        (tmp / ".parts").mkdir()
        for split in splits:
            path = tokens / f"{split}.safetensors"
            if not path.is_file():
                raise DataError(f"{path}: token ids not found; run `dvc repro tokenize` first")
            arrays, _ = open_safetensors(path)
            seed = cfg.seed if split == "train" else cfg.heldout_seed
            for i, (lo, hi) in enumerate(paragraph_shards(arrays["sentence_offsets"], arrays["paragraph_offsets"],
                                                          cfg.shard_tokens)):
                prefix = str(tmp / f".parts/{split}-{i:05d}")
                jobs.append((split, (str(path), lo, hi, cfg, len(vocab), seed, i, prefix)))
        sums = pool_map(pairs_shard, [args for _, args in jobs], n_workers)
        stats, shards = {}, {}
        for split in splits:
            mine = [(args[-1], s) for (sp, args), s in zip(jobs, sums) if sp == split]
            n = sum(s["pairs"] for _, s in mine)
            write_pairs(tmp / f"{split}.safetensors", [p for p, _ in mine], n, cfg, vocab.sha256)
            stats.update({f"{split}_{k}": v for k, v in sums_stats([s for _, s in mine]).items()})
            shards[split] = len(mine)
        shutil.rmtree(tmp / ".parts")
    return stats, shards
