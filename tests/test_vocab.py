"""The vocabulary rule and the flat id arrays, on tiny synthetic corpora."""
from collections import Counter

import numpy as np
import pytest

from minibert.data.corpus import read_paragraphs
from minibert.data.vocab import PAD, SPECIALS, UNK, Vocab, build_vocab, encode_paragraphs, split_stats
from minibert.errors import DataError


def synthetic_paragraphs(rng, n_para=37, words=99):
    vocab = [f"w{i}" for i in range(words)]
    p = 1.0 / np.arange(1, words + 1)  # Zipf-like so min_freq cuts somewhere
    p /= p.sum()
    return [[list(rng.choice(vocab, size=rng.integers(1, 13), p=p)) for _ in range(rng.integers(2, 7))]
            for _ in range(n_para)]


def test_vocab_rule_min_freq_order_and_specials():
    paras = synthetic_paragraphs(np.random.default_rng(7))
    paras[0][0] += ["<unk>"] * 9  # WikiText has literal <unk>: it must map to the special, not a new entry
    counts = Counter(t for p in paras for s in p for t in s)
    vocab = build_vocab(paras, min_freq=5)
    assert vocab.tokens[:5] == SPECIALS
    words = vocab.tokens[5:]
    assert set(words) == {t for t, c in counts.items() if c >= 5} - {"<unk>"}
    assert [(-counts[t], t) for t in words] == sorted((-counts[t], t) for t in words)
    assert vocab.id("<unk>") == UNK and vocab.id("never-seen") == UNK
    assert vocab.decode(vocab.encode(list(words))) == list(words)


def test_min_freq_one_keeps_everything():
    paras = synthetic_paragraphs(np.random.default_rng(13))
    vocab = build_vocab(paras, min_freq=1)
    assert len(vocab) == len({t for p in paras for s in p for t in s}) + len(SPECIALS)


def test_save_load_round_trip_and_hash(tmp_path):
    vocab = build_vocab(synthetic_paragraphs(np.random.default_rng(0)), 3)
    vocab.save(tmp_path / "vocab.txt")
    again = Vocab.load(tmp_path / "vocab.txt")
    assert again == vocab and again.sha256 == vocab.sha256
    assert build_vocab(synthetic_paragraphs(np.random.default_rng(1)), 3).sha256 != vocab.sha256
    with pytest.raises(DataError, match="not found"):
        Vocab.load(tmp_path / "missing.txt")


def test_encode_offsets_rebuild_the_paragraphs():
    paras = synthetic_paragraphs(np.random.default_rng(3))
    vocab = build_vocab(paras, 2)
    arr = encode_paragraphs(paras, vocab)
    ids, so, po = arr["ids"], arr["sentence_offsets"], arr["paragraph_offsets"]
    assert ids.dtype == np.int32 and so[-1] == len(ids) and po[-1] == len(so) - 1
    for p, para in enumerate(paras):
        sents = range(po[p], po[p + 1])
        assert [vocab.decode(ids[so[s]:so[s + 1]]) for s in sents] == \
               [[t if t in vocab else "<unk>" for t in sent] for sent in para]
    stats = split_stats(arr)
    assert stats["paragraphs"] == len(paras) and stats["tokens"] == len(ids)
    assert stats["unk_rate"] == pytest.approx(np.mean(ids == UNK), abs=1e-6)
    assert PAD not in ids


def test_the_book_paragraph_rule(tmp_path):
    f = tmp_path / "wiki.train.tokens"
    f.write_text(" \n = Title = \n One sentence only .\n A b . C d , e . F .\n x . y\n")
    assert read_paragraphs(f) == [[["a", "b"], ["c", "d", ",", "e"], ["f", "."]], [["x"], ["y"]]]
