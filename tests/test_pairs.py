"""NSP pairs and MLM masks on tiny synthetic corpora: layout, the 80/10/10 rule, determinism."""
import numpy as np
import pytest

from minibert.config import PairsConfig
from minibert.pairs import FIELDS, make_pairs, pair_stats
from minibert.vocab import CLS, MASK, PAD, SEP, SPECIALS


def synthetic_split(rng, n_para=99, vocab_size=37, max_sent=13):
    """Encoded split (ids, offsets) with ragged paragraphs; ids avoid the specials."""
    n_sent = rng.integers(2, 8, n_para)
    lens = rng.integers(1, max_sent + 1, n_sent.sum())
    ids = rng.integers(len(SPECIALS), vocab_size, lens.sum()).astype(np.int32)
    return {"ids": ids,
            "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}


def sentences(split):
    so = split["sentence_offsets"]
    return [tuple(split["ids"][so[i]:so[i + 1]]) for i in range(len(so) - 1)]


def unmasked(p, i):
    tok = p["token_ids"][i].copy()
    w = p["mlm_weights"][i] > 0
    tok[p["pred_positions"][i][w]] = p["mlm_labels"][i][w]
    return tok


CFG = PairsConfig(max_len=29, mask_rate=0.15, seed=0)


@pytest.fixture(scope="module")
def split():
    return synthetic_split(np.random.default_rng(7))


@pytest.fixture(scope="module")
def pairs(split):
    return make_pairs(split, CFG, 37, np.random.default_rng(0))


def test_shapes_and_dtypes(pairs):
    n = len(pairs["nsp_labels"])
    assert set(pairs) == set(FIELDS) and n > 100
    assert pairs["token_ids"].shape == pairs["segments"].shape == (n, 29)
    assert pairs["pred_positions"].shape == pairs["mlm_weights"].shape == pairs["mlm_labels"].shape == (n, 4)
    assert pairs["mlm_weights"].dtype == np.float32 and pairs["token_ids"].dtype == np.int32


def test_layout_is_cls_a_sep_b_sep_with_true_or_random_next(split, pairs):
    sents = sentences(split)
    po = split["paragraph_offsets"]
    next_of = {}
    for p in range(len(po) - 1):
        for s in range(po[p], po[p + 1] - 1):
            next_of.setdefault(sents[s], set()).add(sents[s + 1])
    all_sents = set(sents)
    for i in range(len(pairs["nsp_labels"])):
        n = pairs["valid_lens"][i]
        assert n <= CFG.max_len
        tok, seg = unmasked(pairs, i), pairs["segments"][i]
        seps = np.flatnonzero(tok[:n] == SEP)
        assert tok[0] == CLS and len(seps) == 2 and seps[1] == n - 1
        a, b = tuple(tok[1:seps[0]]), tuple(tok[seps[0] + 1:n - 1])
        assert a in all_sents and b in all_sents
        if pairs["nsp_labels"][i] == 1:
            assert b in next_of[a]
        assert (tok[n:] == PAD).all() and (seg[n:] == 0).all()
        assert (seg[:seps[0] + 1] == 0).all() and (seg[seps[0] + 1:n] == 1).all()


def test_prediction_slots(pairs):
    n_real = pairs["mlm_weights"].sum(1)
    expect = np.maximum(1, [round(v * CFG.mask_rate) for v in pairs["valid_lens"]])
    np.testing.assert_array_equal(n_real, expect)
    for i in range(len(n_real)):
        w = pairs["mlm_weights"][i] > 0
        pos, labels = pairs["pred_positions"][i], pairs["mlm_labels"][i]
        assert (np.diff(pos[w]) > 0).all() and (pos[~w] == 0).all() and (labels[~w] == PAD).all()
        real = unmasked(pairs, i)
        assert not np.isin(real[pos[w]], [CLS, SEP, PAD]).any()  # specials are never predicted
        assert (labels[w] >= len(SPECIALS)).all()


def test_masking_proportions_80_10_10():
    """Over ~20k predictions: 80 % <mask>, 10 % kept, 10 % random word (3-sigma tolerance)."""
    split = synthetic_split(np.random.default_rng(13), n_para=1999, vocab_size=99)
    p = make_pairs(split, PairsConfig(max_len=37), 99, np.random.default_rng(5))
    w = p["mlm_weights"] > 0
    shown = np.take_along_axis(p["token_ids"], p["pred_positions"].astype(np.int64), 1)[w]
    labels = p["mlm_labels"][w]
    n = len(labels)
    assert n > 10_000
    masked, kept = shown == MASK, shown == labels
    random_word = ~masked & ~kept
    # a random replacement equals the label with prob 1/94: account for it in "kept"
    p_keep = 0.1 + 0.1 / (99 - len(SPECIALS))
    for share, expect in [(masked.mean(), 0.8), (kept.mean(), p_keep), (random_word.mean(), 0.1 - 0.1 / 94)]:
        assert abs(share - expect) < 3 * np.sqrt(expect * (1 - expect) / n)
    assert not np.isin(shown[random_word], [PAD, CLS, SEP, MASK]).any()


def test_nsp_is_about_half(pairs):
    split = synthetic_split(np.random.default_rng(1), n_para=999)
    labels = make_pairs(split, CFG, 37, np.random.default_rng(3))["nsp_labels"]
    assert abs(labels.mean() - 0.5) < 3 * np.sqrt(0.25 / len(labels))


def test_long_pairs_are_dropped(split):
    short = make_pairs(split, PairsConfig(max_len=13), 37, np.random.default_rng(0))
    assert (short["valid_lens"] <= 13).all() and short["token_ids"].shape[1] == 13
    assert len(short["nsp_labels"]) < len(make_pairs(split, CFG, 37, np.random.default_rng(0))["nsp_labels"])


def test_same_seed_same_bytes_other_seed_differs(split):
    a = make_pairs(split, CFG, 37, np.random.default_rng(42))
    b = make_pairs(split, CFG, 37, np.random.default_rng(42))
    c = make_pairs(split, CFG, 37, np.random.default_rng(43))
    assert all(a[k].tobytes() == b[k].tobytes() for k in FIELDS)
    assert any(a[k].tobytes() != c[k].tobytes() for k in FIELDS)


def test_stats(pairs):
    s = pair_stats(pairs)
    assert s["pairs"] == len(pairs["nsp_labels"])
    assert s["mean_preds"] == pytest.approx(pairs["mlm_weights"].sum(1).mean(), abs=1e-4)
    assert 0 < s["nsp_positive_rate"] < 1 and 5 <= s["mean_len"] <= 29
