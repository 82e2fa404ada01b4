"""minibert.evaluation.blimp: reading the archive, the vocabulary filter, pseudo-log-likelihood against a
hand-worked tiny model and a plain one-sentence-at-a-time reference, the unigram control, the tie rule,
and `score` end to end on a tiny BERT."""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from minibert.config import ModelConfig
from minibert.data.vocab import CLS, MASK, SEP, SPECIALS, Vocab
from minibert.errors import DataError
from minibert.evaluation.blimp import encode_pairs, pseudo_log_likelihood, read_blimp, right, score, summary, unigram_scores
from minibert.model.bert import build_model

TINY = ModelConfig(num_layers=1, hidden=12, heads=3, ffn_hidden=37, dropout=0.1, max_len=13)
WORDS = ("the", "cat", "cats", "sleeps", "sleep", "dog", "is", "are", "who", "saw", "n't", "do", "he")
VOCAB = Vocab(SPECIALS + WORDS + tuple(f"w{i}" for i in range(37 - len(SPECIALS) - len(WORDS))))
S = len(SPECIALS)


def row(good, bad, field="morphology", term="agreement", uid="sva"):
    return {"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term, "UID": uid,
            "pairID": "0"}


def blimp_zip(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_read_blimp_skips_junk_members(tmp_path):
    rows = [row("The cat sleeps.", "The cat sleep."), row("Who is he?", "Who are he?", "syntax", "island", "wh")]
    path = blimp_zip(tmp_path / "blimp.zip", {
        "blimp/data/sva.jsonl": json.dumps(rows[0]) + "\n\n",
        "blimp/data/wh.jsonl": json.dumps(rows[1]) + "\n",
        "__MACOSX/blimp/data/._sva.jsonl": "\x00\x05junk",
        "__MACOSX/blimp/data/sva.jsonl": "\x00\x05junk",  # macOS metadata even without the ._ prefix
        "blimp/data/.hidden.jsonl": "not json",
        "blimp/README.md": "# BLiMP\n"})
    df = read_blimp(path)
    assert df.to_dict("records") == [
        {"good": "The cat sleeps.", "bad": "The cat sleep.", "field": "morphology", "linguistics_term": "agreement",
         "UID": "sva"},
        {"good": "Who is he?", "bad": "Who are he?", "field": "syntax", "linguistics_term": "island", "UID": "wh"}]


def test_bad_archives_are_one_line(tmp_path):
    (tmp_path / "plain.zip").write_text("not a zip at all")
    broken = dict(row("a", "b"))
    del broken["field"]
    blimp_zip(tmp_path / "nokey.zip", {"data/x.jsonl": json.dumps(row("a", "b")) + "\n" + json.dumps(broken) + "\n"})
    blimp_zip(tmp_path / "empty.zip", {"README": "nothing"})
    for name, needle in (("plain.zip", "not a valid zip"), ("nokey.zip", "data/x.jsonl:2: not a BLiMP row"),
                         ("empty.zip", "holds no data/*.jsonl")):
        with pytest.raises(DataError) as e:
            read_blimp(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_right_counts_a_tie_as_wrong():
    assert right(np.array([-1.0, -2.0, -3.0, -5.0]), np.array([-2.0, -2.0, -1.0, -5.0])).tolist() == [
        True, False, False, False]


def test_vocabulary_filter_drops_pairs_and_summary_counts_them():
    df = pd.DataFrame([
        {"good": "The cat sleeps", "bad": "The cat sleep", "field": "m", "linguistics_term": "t", "UID": "u"},
        {"good": "The zebra sleeps", "bad": "The cat sleep", "field": "m", "linguistics_term": "t", "UID": "u"},
        {"good": "He doesn't", "bad": "He do n't", "field": "s", "linguistics_term": "t", "UID": "v"},  # "does" unknown
        {"good": "He don't", "bad": "Cats sleep", "field": "s", "linguistics_term": "t", "UID": "v"},
        {"good": "the cat " * 6, "bad": "the cat", "field": "s", "linguistics_term": "t", "UID": "v"},  # 12 + 2 > 13
    ])
    kept, good, bad = encode_pairs(df, VOCAB, max_len=13)
    v = VOCAB.id
    assert kept["good"].tolist() == ["The cat sleeps", "He don't"]
    assert good == [[v("the"), v("cat"), v("sleeps")], [v("he"), v("do"), v("n't")]]
    assert bad == [[v("the"), v("cat"), v("sleep")], [v("cats"), v("sleep")]]
    m = summary(kept, len(df), {"x": np.array([True, False])})
    assert (m["pairs"], m["total_pairs"], m["paradigms"], m["x"]["accuracy"]) == (2, 5, 2, 0.5)
    assert m["x"]["field"] == {"m": 1.0, "s": 0.0}


def test_unigram_scores_hand_values_and_reordering_ties():
    counts = np.zeros(len(VOCAB))
    counts[[S, S + 1, S + 2]] = [5, 3, 2]  # total 10
    got = unigram_scores([[S, S + 1], [S + 2], [S + 1, S]], counts)
    assert got == pytest.approx([math.log(0.5) + math.log(0.3), math.log(0.2), math.log(0.3) + math.log(0.5)])
    assert right(got[[2]], got[[0]]).tolist() == [False]  # the same words reordered: a tie, so wrong


def zeroed_decoder_model(seed: int):
    """A tiny BERT whose MLM decoder weight is 0: its logits are the decoder bias, whatever the input."""
    model = build_model(TINY, len(VOCAB), seed=seed)
    decoder = model.mlm[-1]
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.copy_(torch.randn(len(VOCAB), generator=torch.Generator().manual_seed(seed)) * 3)
    return model, torch.log_softmax(decoder.bias.detach().double(), -1)


SENTENCES = [[S + 1, S + 4, S + 2], [S + 7], [S + 3, S + 3, S + 9, S + 11, S + 20, S + 5, S + 1], [S + 2, S + 30]]


def test_pll_of_a_bias_only_model_is_the_sum_of_its_log_softmax():
    model, logp = zeroed_decoder_model(3)
    want = [float(sum(logp[w] for w in s)) for s in SENTENCES]
    for batch_size in (1, 5, 512):  # chunks that split sentences, and one chunk for all
        assert pseudo_log_likelihood(model, SENTENCES, batch_size) == pytest.approx(want, rel=1e-5)


def plain_pll(model, sentence: list[int]) -> float:
    """One masked copy at a time: `<cls> w1 .. <mask> .. wn <sep>` through encode, then the MLM head at the
    masked position, the true word's log-probability summed."""
    total = 0.0
    for i, w in enumerate(sentence):
        ids = [CLS, *sentence, SEP]
        ids[i + 1] = MASK
        tokens = torch.tensor([ids])
        enc = model.encode(tokens, torch.zeros_like(tokens), torch.tensor([len(ids)]))  # (1, T, H)
        total += float(torch.log_softmax(model.mlm(enc[0, i + 1]).double(), -1)[w])
    return total


def test_pll_matches_a_plain_one_masked_copy_at_a_time_reference():
    model = build_model(TINY, len(VOCAB), seed=11).eval()
    with torch.no_grad():
        want = [plain_pll(model, s) for s in SENTENCES]
    assert pseudo_log_likelihood(model, SENTENCES, batch_size=5) == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert model.training is False
    model.train()
    pseudo_log_likelihood(model, SENTENCES[:1])
    assert model.training  # its mode is given back


def test_score_end_to_end_on_a_tiny_model():
    pairs = [("The cat sleeps", "The cat sleep", "morphology", "agreement", "sva"),
             ("The cats sleep", "The cats sleeps", "morphology", "agreement", "sva"),
             ("Who is he", "Who are he", "syntax", "island", "wh"),
             ("The dog saw the cat", "The cat saw the dog", "syntax", "island", "wh"),  # reordered: unigram tie
             ("The zebra sleeps", "The zebra sleep", "syntax", "island", "wh")]  # out of vocabulary: dropped
    df = pd.DataFrame(pairs, columns=["good", "bad", "field", "linguistics_term", "UID"])
    counts = np.zeros(len(VOCAB))
    for w, c in {"the": 30, "cat": 5, "cats": 2, "sleeps": 1, "sleep": 4, "who": 3, "is": 6, "are": 2, "he": 4,
                 "dog": 3, "saw": 2}.items():
        counts[VOCAB.id(w)] = c
    # unigram: sleeps 1 < sleep 4 (wrong), cats sleep vs cats sleeps: 4 > 1 (right), is 6 > are 2 (right), tie (wrong)
    models = {"pretrained": build_model(TINY, len(VOCAB), seed=5), "untrained": zeroed_decoder_model(7)[0]}
    m, per_paradigm = score(models, counts, df, VOCAB, max_len=13, batch_size=7)
    assert (m["pairs"], m["total_pairs"], m["paradigms"]) == (4, 5, 2)
    assert m["unigram"]["accuracy"] == 0.5 and m["unigram"]["field"] == {"morphology": 0.5, "syntax": 0.5}
    ids = lambda t: [VOCAB.id(w) for w in t.lower().split()]  # noqa: E731
    with torch.no_grad():
        ref = [plain_pll(models["pretrained"].eval(), ids(g)) > plain_pll(models["pretrained"], ids(b))
               for g, b, *_ in pairs[:4]]
    assert m["pretrained"]["accuracy"] == pytest.approx(np.mean(ref))
    assert per_paradigm[["UID", "pairs", "total"]].values.tolist() == [["sva", 2, 2], ["wh", 2, 3]]
    assert per_paradigm["accuracy_unigram"].tolist() == [0.5, 0.5]
