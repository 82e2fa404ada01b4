"""Dynamic masks: a function of (seed, step), BERT's 80/10/10 rule, never a special token."""
import math

import numpy as np
import pytest
from tiny_project import synthetic_split

from minibert.config import PairsConfig
from minibert.data.masking import candidates, original_tokens, redraw, step_rng
from minibert.data.pairs import assemble, make_pairs
from minibert.data.vocab import CLS, MASK, PAD, SEP, SPECIALS

V = 99


def tiny_pairs(seed=7, n_para=99, max_len=29):
    return make_pairs(synthetic_split(np.random.default_rng(seed), n_para, V), PairsConfig(max_len=max_len), V,
                      np.random.default_rng(seed))


def test_original_tokens_undo_the_static_masks():
    """The pairs stage's uncorrupted layout (assemble, before masking) comes back from the masked pairs."""
    split = synthetic_split(np.random.default_rng(13), 37, V)
    rng = np.random.default_rng(13)
    pairs = make_pairs(split, PairsConfig(max_len=29), V, rng)
    # the same draws up to the masks: paragraph order, NSP choices, then assemble
    rng = np.random.default_rng(13)
    from minibert.data.pairs import candidate_pairs, choose_next
    order = rng.permutation(len(split["paragraph_offsets"]) - 1)
    a = candidate_pairs(split["paragraph_offsets"], order)
    b, _ = choose_next(a, split["paragraph_offsets"], rng)
    lengths = np.diff(split["sentence_offsets"])
    keep = lengths[a] + lengths[b] + 3 <= 29
    plain, _, _, _ = assemble(split["ids"], split["sentence_offsets"], a[keep], b[keep], 29)
    assert (pairs["token_ids"] != plain).any()  # the static masks did change tokens
    got = original_tokens(pairs["token_ids"], pairs["pred_positions"], pairs["mlm_weights"], pairs["mlm_labels"])
    np.testing.assert_array_equal(got, plain)


def test_candidates_are_the_words_of_both_sentences():
    # <cls> a a <sep> b <sep> <pad>: valid length 6, the first <sep> at 3
    segments = np.array([[0, 0, 0, 0, 1, 1, 0]])
    got = candidates(segments, np.array([6]))
    assert got.tolist() == [[False, True, True, False, True, False, False]]


def test_masks_are_a_function_of_seed_and_step():
    pairs = tiny_pairs()
    a = redraw(pairs, 0.2, V, step_rng(3, 17))
    b = redraw(pairs, 0.2, V, step_rng(3, 17))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for other in (step_rng(3, 18), step_rng(4, 17)):
        c = redraw(pairs, 0.2, V, other)
        assert (c["pred_positions"] != a["pred_positions"]).any()
    # masks redrawn from the uncorrupted tokens: redrawing from a redrawn batch gives the same batch
    again = redraw(a, 0.2, V, step_rng(3, 17))
    for k in a:
        np.testing.assert_array_equal(again[k], a[k])


@pytest.mark.parametrize("rate", [0.15, 0.4, 0.9])
def test_slots_never_land_on_specials_and_other_tokens_stay(rate):
    pairs = tiny_pairs()
    plain = original_tokens(pairs["token_ids"], pairs["pred_positions"], pairs["mlm_weights"], pairs["mlm_labels"])
    out = redraw(pairs, rate, V, step_rng(0, 5))
    real = out["mlm_weights"] > 0
    rows = np.broadcast_to(np.arange(len(plain))[:, None], real.shape)
    at = plain[rows[real], out["pred_positions"][real]]
    assert not np.isin(at, [PAD, CLS, SEP]).any()  # judged by the token ids, not the layout rule
    np.testing.assert_array_equal(out["mlm_labels"][real], at)
    assert not np.isin(out["token_ids"][rows[real], out["pred_positions"][real]], [PAD, CLS, SEP]).any()
    touched = np.zeros(plain.shape, bool)
    touched[rows[real], out["pred_positions"][real]] = True
    np.testing.assert_array_equal(out["token_ids"][~touched], plain[~touched])
    # slots per row: max(1, round-half-even(rate * len)), at most the row's len - 3 words
    want = np.minimum(np.maximum(1, [round(rate * n) for n in pairs["valid_lens"]]), pairs["valid_lens"] - 3)
    np.testing.assert_array_equal(real.sum(1), want)
    assert out["pred_positions"].shape[1] == round(rate * 29)


def test_80_10_10_rule_holds_within_binomial_bounds():
    """Over ~30k slots: <mask> 80 %, the original word 10 % (+ the random draw hitting it), a random
    ordinary word the rest. Each count within 5 standard deviations of its binomial mean."""
    pairs = tiny_pairs(seed=11, n_para=2000)
    plain = original_tokens(pairs["token_ids"], pairs["pred_positions"], pairs["mlm_weights"], pairs["mlm_labels"])
    out = redraw(pairs, 0.3, V, step_rng(0, 1))
    real = out["mlm_weights"] > 0
    rows = np.broadcast_to(np.arange(len(plain))[:, None], real.shape)
    new = out["token_ids"][rows[real], out["pred_positions"][real]]
    old = plain[rows[real], out["pred_positions"][real]]
    n = len(new)
    assert n > 20_000
    ordinary = V - len(SPECIALS)
    p_same = 0.1 + 0.1 / ordinary  # the random word is the original one 1 time in `ordinary`
    for k, p in ((int((new == MASK).sum()), 0.8), (int((new == old).sum()), p_same),
                 (int(((new != MASK) & (new != old)).sum()), 0.1 - 0.1 / ordinary)):
        assert abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (k, n, p)
    assert new.min() >= len(SPECIALS) or set(np.unique(new[new < len(SPECIALS)])) == {MASK}
