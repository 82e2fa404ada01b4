"""NSP pairs and MLM masks on tiny synthetic corpora: layout, the 80/10/10 rule, determinism."""
import os

import numpy as np
import pytest

from minibert.config import PairsConfig
from minibert.data.pairs import FIELDS, make_pairs, pair_stats
from minibert.data.vocab import CLS, MASK, PAD, SEP, SPECIALS
from minibert.errors import DataError


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
    assert pairs["nsp_labels"].dtype == pairs["valid_lens"].dtype == np.int32


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


def unique_sentence_split(n_para=99, seed=13):
    """Like `synthetic_split`, but sentence i starts with the token 5 + i: every sentence is unique,
    so a pair's `b` names the one sentence it was cut from."""
    rng = np.random.default_rng(seed)
    n_sent = rng.integers(2, 8, n_para)
    lens = rng.integers(1, 7, n_sent.sum())
    ids = [np.concatenate([[len(SPECIALS) + i], rng.integers(len(SPECIALS), 37, n - 1)]) for i, n in enumerate(lens)]
    return {"ids": np.concatenate(ids).astype(np.int32),
            "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            "paragraph_offsets": np.concatenate([[0], np.cumsum(n_sent)]).astype(np.int64)}


def test_nsp_negatives_are_rarely_the_true_next_sentence():
    """A label-0 `b` is a random sentence of a random paragraph: it is the true next sentence only when
    the draw lands on a's paragraph (1/99) and then on that very sentence (<= 1/2), so p <= 1/198.
    With n0 = 186 negatives here, P(Binomial(186, 1/198) >= 19) < 1e-15: a bound, not a formula."""
    split = unique_sentence_split()
    p = make_pairs(split, PairsConfig(max_len=29), 37, np.random.default_rng(3))
    neg = np.flatnonzero(p["nsp_labels"] == 0)
    pos = np.flatnonzero(p["nsp_labels"] == 1)
    assert len(neg) > 150 and len(pos) > 150

    def sentence_ids(i):  # (a, b) sentence indices, read back from the unique first tokens
        tok = unmasked(p, i)
        sep = int(np.flatnonzero(tok == SEP)[0])
        return int(tok[1]) - len(SPECIALS), int(tok[sep + 1]) - len(SPECIALS)

    assert all(b == a + 1 for a, b in map(sentence_ids, pos))
    true_next = sum(b == a + 1 for a, b in map(sentence_ids, neg))
    assert true_next < len(neg) / 10, f"{true_next} of {len(neg)} negatives are the true next sentence"


def test_nsp_negatives_are_uniform_over_paragraphs_and_positions():
    """The book's negative: a uniform paragraph, then a uniform sentence in it. Read back through the
    unique first tokens: (i + 1/2) / n_p of sentence i of n_p has mean exactly 1/2 and variance <= 1/12,
    so over n0 ~ 1900 negatives a 6-sigma band is +-0.04 (false alarm ~ 2e-9); and 1900 uniform draws
    over 999 paragraphs hit ~ 850 distinct ones (below 600 is a > 15-sigma event)."""
    split = unique_sentence_split(n_para=999, seed=5)
    p = make_pairs(split, PairsConfig(max_len=29), 37, np.random.default_rng(9))
    po = split["paragraph_offsets"]
    b_sent = []
    for i in np.flatnonzero(p["nsp_labels"] == 0):
        tok = unmasked(p, i)
        b_sent.append(int(tok[int(np.flatnonzero(tok == SEP)[0]) + 1]) - len(SPECIALS))
    para = np.searchsorted(po, b_sent, side="right") - 1
    rel = (np.array(b_sent) - po[para] + 0.5) / (po[para + 1] - po[para])
    assert len(b_sent) > 1500
    assert abs(rel.mean() - 0.5) < 6 * np.sqrt(1 / 12 / len(b_sent)), rel.mean()
    assert len(set(para.tolist())) > 600


def test_pair_of_exactly_max_len_is_kept():
    """Hand-worked: 13 paragraphs of 4 sentences of 5 tokens. Every pair, true or random, is
    1 + 5 + 1 + 5 + 1 = 13 long: max_len 13 keeps all 13 * 3 = 39, max_len 12 keeps none."""
    lens = np.full(13 * 4, 5)
    split = {"ids": np.arange(len(SPECIALS), len(SPECIALS) + lens.sum()).astype(np.int32) % 37 + len(SPECIALS),
             "sentence_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
             "paragraph_offsets": np.arange(0, 13 * 4 + 1, 4).astype(np.int64)}
    kept = make_pairs(split, PairsConfig(max_len=13), 99, np.random.default_rng(0))
    assert len(kept["nsp_labels"]) == 39 and (kept["valid_lens"] == 13).all()
    assert not (kept["token_ids"] == PAD).any()  # exactly full: no padding at all
    assert len(make_pairs(split, PairsConfig(max_len=12), 99, np.random.default_rng(0))["nsp_labels"]) == 0


def test_stats_on_a_hand_worked_case():
    """Five pairs worked by hand: NSP labels 1,0,0,1,1 -> 3/5; lengths 5,9,13,7,11 -> 45/5 = 9;
    real MLM slots 1,2,2,1,2 -> 8/5 = 1.6. Then three, whose means are thirds."""
    w = np.array([[1, 0], [1, 1], [1, 1], [1, 0], [1, 1]], dtype=np.float32)
    pairs = {"nsp_labels": np.array([1, 0, 0, 1, 1], dtype=np.int32),
             "valid_lens": np.array([5, 9, 13, 7, 11], dtype=np.int32), "mlm_weights": w}
    assert pair_stats(pairs) == {"pairs": 5, "nsp_positive_rate": 0.6, "mean_len": 9.0, "mean_preds": 1.6}
    # thirds pin the rounding of metrics/pairs.json: 2/3 -> 0.666667 (6 places), 17/3 -> 5.6667, 5/3 -> 1.6667
    thirds = {"nsp_labels": np.array([1, 0, 1], dtype=np.int32), "valid_lens": np.array([5, 6, 6], dtype=np.int32),
              "mlm_weights": w[[0, 1, 2]]}
    assert pair_stats(thirds) == {"pairs": 3, "nsp_positive_rate": 0.666667, "mean_len": 5.6667, "mean_preds": 1.6667}
    none = {"nsp_labels": np.zeros(0, np.int32), "valid_lens": np.zeros(0, np.int32),
            "mlm_weights": np.zeros((0, 2), np.float32)}
    assert pair_stats(none) == {"pairs": 0, "nsp_positive_rate": 0.0, "mean_len": 0.0, "mean_preds": 0.0}


# ---------------------------------------------------------------------------- shards (the pairs stage)


def test_paragraph_shards_by_first_token_hand_case():
    from minibert.data.pairs import paragraph_shards
    # six paragraphs whose first tokens are at 0, 600, 1100, 1900, 2100, 3500 (one sentence each)
    sent = np.array([0, 600, 1100, 1900, 2100, 3500, 3600])
    para = np.arange(7)
    assert paragraph_shards(sent, para, 1000) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert paragraph_shards(sent, para, 10_000) == [(0, 6)]
    assert paragraph_shards(np.array([0]), np.array([0]), 1000) == [(0, 0)]


def tokens_dir(root):
    """data/tokens of a tiny corpus: vocab of 99 and three synthetic splits (~3000 train tokens)."""
    from minibert.artifacts import save_arrays
    from minibert.data.vocab import Vocab

    vocab = Vocab(SPECIALS + tuple(f"w{i}" for i in range(99 - len(SPECIALS))))
    (root / "tokens").mkdir(parents=True)
    vocab.save(root / "tokens/vocab.txt")
    for split, seed, n in (("train", 7, 99), ("valid", 8, 13), ("test", 9, 13)):
        save_arrays(root / f"tokens/{split}.safetensors", synthetic_split(np.random.default_rng(seed), n, 99),
                    {"vocab_sha256": vocab.sha256})
    return vocab


def run_pairs_stage(root, name, shard_tokens, workers):
    import subprocess
    import sys

    import yaml

    from tests.tiny_project import ROOT

    (root / f"{name}.yaml").write_text(yaml.safe_dump(
        {"data": {"workers": workers}, "pairs": {"max_len": 29, "shard_tokens": shard_tokens}, "model": {"max_len": 29}}))
    out = subprocess.run([sys.executable, "-m", "stages.pairs", "--params", str(root / f"{name}.yaml"),
                          "--tokens", str(root / "tokens"), "--out", str(root / name / "pairs"),
                          "--metrics", str(root / name / "metrics")],
                         cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    return {p.relative_to(root / name).as_posix(): p.read_bytes() for p in sorted((root / name).rglob("*")) if p.is_file()}, out.stdout


def test_stage_bytes_do_not_depend_on_the_worker_count(tmp_path):
    tokens_dir(tmp_path)
    one, log = run_pairs_stage(tmp_path, "w1", 1000, 1)
    two, _ = run_pairs_stage(tmp_path, "w2", 1000, 2)
    assert "train 363 (4 shards)" in log  # really sharded
    assert sorted(one) == ["metrics/pairs.json", "pairs/test.safetensors", "pairs/train.safetensors",
                           "pairs/valid.safetensors"]
    assert one == two


def test_one_shard_is_the_unsharded_make_pairs(tmp_path):
    from minibert.artifacts import load_arrays, save_arrays

    vocab = tokens_dir(tmp_path)
    got, log = run_pairs_stage(tmp_path, "whole", 10_000_000, 2)
    assert "(1 shard)" in log
    cfg = PairsConfig(max_len=29)
    for split, seed in (("train", cfg.seed), ("valid", cfg.heldout_seed)):
        ref = make_pairs(load_arrays(tmp_path / f"tokens/{split}.safetensors"), cfg, len(vocab),
                         np.random.default_rng(seed))
        save_arrays(tmp_path / "ref.safetensors", ref, {"vocab_sha256": vocab.sha256})
        assert got[f"pairs/{split}.safetensors"] == (tmp_path / "ref.safetensors").read_bytes()


def test_each_shard_draws_from_its_documented_generator(tmp_path):
    """The stage's train file, sharded (4 shards), is the concatenation of `make_pairs` on each shard's
    paragraphs with the generator the docs name: shard 0 the seed itself, shard k > 0 the seed's k-th
    spawned child (`SeedSequence(seed).spawn(k + 1)[k]`, spelled here without `shard_rng`)."""
    from minibert.artifacts import load_arrays
    from minibert.data.pairs import paragraph_shards

    vocab = tokens_dir(tmp_path)
    got, log = run_pairs_stage(tmp_path, "sharded", 1000, 2)
    assert "train 363 (4 shards)" in log
    (tmp_path / "got.safetensors").write_bytes(got["pairs/train.safetensors"])
    got = load_arrays(tmp_path / "got.safetensors")
    split = load_arrays(tmp_path / "tokens/train.safetensors")
    so, po = split["sentence_offsets"], split["paragraph_offsets"]
    seed, start = PairsConfig(max_len=29).seed, 0
    shards = paragraph_shards(so, po, 1000)
    assert len(shards) == 4
    for k, (lo, hi) in enumerate(shards):
        sent = so[po[lo]:po[hi] + 1]
        part = {"ids": split["ids"][sent[0]:sent[-1]], "sentence_offsets": sent - sent[0],
                "paragraph_offsets": po[lo:hi + 1] - po[lo]}
        rng = np.random.default_rng(seed if k == 0 else np.random.SeedSequence(seed).spawn(k + 1)[k])
        want = make_pairs(part, PairsConfig(max_len=29), len(vocab), rng)
        n = len(want["nsp_labels"])
        assert n > 0
        for f in FIELDS:
            assert np.array_equal(got[f][start:start + n], want[f]), (k, f)
        start += n
    assert start == len(got["nsp_labels"])


def test_nsp_negatives_come_from_their_own_shard(tmp_path):
    """The documented rule: b of a random pair is a sentence of the same shard (checked on b's of
    three or more tokens, so a chance collision with another shard's sentence is negligible)."""
    from minibert.artifacts import save_arrays
    from minibert.data.pairs import pairs_shard, paragraph_shards
    from minibert.data.shards import open_safetensors

    split = synthetic_split(np.random.default_rng(7), 99, 99)
    save_arrays(tmp_path / "t.safetensors", split)
    arrays, _ = open_safetensors(tmp_path / "t.safetensors")
    shards = paragraph_shards(arrays["sentence_offsets"], arrays["paragraph_offsets"], 1000)
    sents, po = sentences(split), split["paragraph_offsets"]
    checked = outside_anywhere = 0
    for i, (lo, hi) in enumerate(shards):
        pairs_shard(str(tmp_path / "t.safetensors"), lo, hi, CFG, 99, 0, i, str(tmp_path / f"p{i}"))
        p = {k: np.fromfile(tmp_path / f"p{i}.{k}", dtype=np.float32 if k == "mlm_weights" else np.int32)
             for k in FIELDS}
        n = len(p["nsp_labels"])
        p = {k: v.reshape(n, -1) if v.size != n else v for k, v in p.items()}
        mine = set(sents[po[lo]:po[hi]])
        others = set(sents) - mine
        for r in range(n):
            tok, vl = unmasked(p, r), p["valid_lens"][r]
            seps = np.flatnonzero(tok[:vl] == SEP)
            b = tuple(tok[seps[0] + 1:vl - 1])
            if p["nsp_labels"][r] == 0 and len(b) >= 3:
                assert b in mine, (i, r)
                checked += 1
                outside_anywhere += b in others
    assert len(shards) >= 3 and checked > 50


def test_load_pairs_maps_the_file_and_training_tensors_share_the_map(tmp_path, pairs):
    """pretrain/evaluate never copy the train set: `load_pairs` gives memmaps of the file, and
    `to_tensors` on CPU wraps the very same memory (same address), so a step reads only its rows."""
    import torch

    from minibert.artifacts import save_arrays
    from minibert.data.batches import to_tensors
    from minibert.data.pairs import load_pairs

    save_arrays(tmp_path / "p.safetensors", pairs, {"vocab_sha256": "ab" * 32})
    arrays, meta = load_pairs(tmp_path / "p.safetensors")
    assert meta == {"vocab_sha256": "ab" * 32}
    tensors = to_tensors(arrays, torch.device("cpu"))
    for k in FIELDS:
        assert isinstance(arrays[k], np.memmap) and np.array_equal(arrays[k], pairs[k])
        assert tensors[k].data_ptr() == arrays[k].ctypes.data
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}")
    with pytest.raises(DataError, match="bad.safetensors: not a safetensors file"):
        load_pairs(tmp_path / "bad.safetensors")


def test_pairs_stage_on_a_full_filesystem_is_one_line_and_keeps_the_old_output(tmp_path, small_fs):
    """--out on a 64 kB filesystem (the shards' parts take ~150 kB): exit 1, one `error: pairs:` line
    naming the folder and the free space, the previous folder unchanged, no temp, no metrics."""
    import subprocess
    import sys

    import yaml

    from tests.tiny_project import ROOT

    tokens_dir(tmp_path)
    fs = small_fs("64k")
    (fs / "pairs").mkdir()
    (fs / "pairs/train.safetensors").write_bytes(b"old pairs")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"workers": 2}, "pairs": {"max_len": 29, "shard_tokens": 1000},
                                                     "model": {"max_len": 29}}))
    out = subprocess.run([sys.executable, "-m", "stages.pairs", "--params", str(tmp_path / "p.yaml"),
                          "--tokens", str(tmp_path / "tokens"), "--out", str(fs / "pairs"),
                          "--metrics", str(tmp_path / "metrics")],
                         cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(
        f"error: pairs: cannot write {fs}/pairs: No space left on device ("), out.stderr
    assert "free there" in out.stderr
    assert os.listdir(fs) == ["pairs"] and os.listdir(fs / "pairs") == ["train.safetensors"]
    assert (fs / "pairs/train.safetensors").read_bytes() == b"old pairs"
    assert not (tmp_path / "metrics").exists()


def test_injected_enospc_at_the_shard_writer(tmp_path, monkeypatch, capsys):
    """In-process (one worker): a shard part's write fails half-way; the stage says one line and
    leaves nothing of its temp folder."""
    import errno

    import yaml

    import minibert.data.pairs as pairs_mod
    from stages.pairs import main

    tokens_dir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"workers": 1}, "pairs": {"max_len": 29, "shard_tokens": 1000},
                                                     "model": {"max_len": 29}}))
    real_open, calls = open, []

    def open_then_fail(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        calls.append(path)
        if len(calls) == 9:  # the second shard's second field
            f.write(b"torn")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return f

    monkeypatch.setattr(pairs_mod, "open", open_then_fail, raising=False)
    with pytest.raises(SystemExit) as stop:
        main(params=tmp_path / "p.yaml", tokens=tmp_path / "tokens", out=tmp_path / "pairs", metrics=tmp_path / "m")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: pairs: cannot write {tmp_path / 'pairs'}: No space left on device (")
    assert sorted(os.listdir(tmp_path)) == ["p.yaml", "tokens"]
