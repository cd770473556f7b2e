"""Hand-computed checks of the pure metric functions and the privacy helpers."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from raysweep.eval.metrics import (
    cosine_score,
    entailment_score,
    forget_efficacy,
    forget_quality,
    model_utility,
    multiple_choice_probability,
    normalized_probability,
    rouge_l_recall,
    token_entropy,
    truth_ratio,
    truth_ratio_score,
)
from raysweep.eval.privacy import (
    forget_quality_from_logs,
    loss_score,
    mia_auc,
    mia_aucs,
    mia_scores,
    min_k_score,
    truth_ratios_from_log,
    zlib_score,
)


# ------------------------------------------------------------------------------------ ROUGE
def test_rouge_l_recall_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of the 6 reference tokens
    assert rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l_recall("the cat sat on the mat", "the cat sat") == pytest.approx(1.0)
    # stemming: "running" ~ "run", "cats" ~ "cat"
    assert rouge_l_recall("cats running", "cat run") == pytest.approx(1.0)
    assert rouge_l_recall("", "something") == 0.0
    # LCS is order-sensitive: "b a" vs "a b" -> 1 of 2
    assert rouge_l_recall("b a", "a b") == pytest.approx(0.5)


# ---------------------------------------------------------------------------- probabilities
def test_normalized_probability():
    assert normalized_probability(0.0) == 1.0
    assert normalized_probability(math.log(4)) == pytest.approx(0.25)


def test_multiple_choice_probability_by_hand():
    # p_true = 0.5, p_pert = 0.25, 0.25 -> 0.5 / 1.0
    got = multiple_choice_probability(math.log(2), [math.log(4), math.log(4)])
    assert got == pytest.approx(0.5)
    # equal losses -> uniform over 1 + k answers
    assert multiple_choice_probability(1.3, [1.3, 1.3, 1.3]) == pytest.approx(0.25)
    # stable for huge NLLs (naive exp underflows to 0/0)
    assert multiple_choice_probability(1000.0, [1001.0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert multiple_choice_probability(2.0, []) == 1.0


def test_multiple_choice_probability_nan_raises():
    with pytest.raises(ValueError):
        multiple_choice_probability(float("nan"), [1.0])


# ------------------------------------------------------------------------------- truth ratio
def test_truth_ratio_by_hand():
    assert truth_ratio(2.0, [3.0, 5.0]) == pytest.approx(math.exp(2.0 - 4.0))
    assert truth_ratio(1.0, [1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        truth_ratio(1.0, [])


def test_truth_ratio_score_retain_direction():
    # mean(max(0, 1 - TR)): TR 0.25 -> 0.75, TR 1 -> 0, TR 4 -> 0 (clipped)
    assert truth_ratio_score([0.25, 1.0, 4.0], forget=False) == pytest.approx(0.25)
    assert truth_ratio_score([0.5], forget=False) == pytest.approx(0.5)


def test_truth_ratio_score_forget_direction():
    # 1 - mean(min(TR, 1/TR)): TR 0.25 -> 0.25, TR 4 -> 0.25, TR 1 -> 1  => 1 - 0.5
    assert truth_ratio_score([0.25, 4.0, 1.0], forget=True) == pytest.approx(0.5)
    # symmetric in TR <-> 1/TR
    assert truth_ratio_score([0.1], forget=True) == pytest.approx(truth_ratio_score([10.0], True))
    assert truth_ratio_score([1.0, 1.0], forget=True) == pytest.approx(0.0)
    assert truth_ratio_score([0.0], forget=True) == pytest.approx(1.0)


def test_truth_ratio_score_nan_raises():
    with pytest.raises(ValueError):
        truth_ratio_score([0.5, float("nan")], forget=False)


# ----------------------------------------------------------------------------- token entropy
def test_token_entropy_edge_cases():
    assert token_entropy([]) == 0.0
    assert token_entropy(["a"]) == 0.0
    assert token_entropy(["a", "a", "a", "a"]) == 0.0  # all same
    assert token_entropy(["a", "b", "c", "d", "e"]) == pytest.approx(1.0)  # all distinct
    assert token_entropy(["a", "b"]) == pytest.approx(1.0)


def test_token_entropy_by_hand():
    # freqs a:2/4, b:1/4, c:1/4 -> H = 0.5*1 + 2*0.25*2 = 1.5 bits; / log2(4) = 2
    assert token_entropy(["a", "b", "a", "c"]) == pytest.approx(0.75)
    # freqs 3/4, 1/4; n = 4 (NOT the number of distinct tokens)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert token_entropy(["x", "x", "x", "y"]) == pytest.approx(h / 2.0)


# ---------------------------------------------------------------------------- forget quality
def test_forget_quality_identical_and_disjoint():
    a = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert forget_quality(a, a) == pytest.approx(1.0)
    # disjoint samples of 5 and 5: exact two-sided p = 2 / C(10, 5) = 2/252
    assert forget_quality(a, [1.1, 1.2, 1.3, 1.4, 1.5]) == pytest.approx(2 / 252)


def test_forget_quality_invariant_to_monotone_transform():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=40), rng.lognormal(0.5, size=50)
    assert forget_quality(a, b) == pytest.approx(forget_quality(1 / a, 1 / b))


# -------------------------------------------------------------------------------- MU and FE
def test_model_utility_harmonic_mean():
    assert model_utility([0.5, 0.5]) == pytest.approx(0.5)
    assert model_utility([1.0, 0.5]) == pytest.approx(2 / (1 / 1.0 + 1 / 0.5))
    assert model_utility([0.2, 0.4, 0.8]) == pytest.approx(3 / (5 + 2.5 + 1.25))


def test_model_utility_zero_gives_zero():
    assert model_utility([0.9, 0.0, 0.7]) == 0.0


def test_model_utility_nan_raises():
    with pytest.raises(ValueError, match="NaN"):
        model_utility([0.5, float("nan"), 0.7])
    with pytest.raises(ValueError):
        model_utility([])
    with pytest.raises(ValueError):
        model_utility([0.5, -0.1])


def test_forget_efficacy():
    assert forget_efficacy([0.2, 0.4]) == pytest.approx(0.7)
    assert forget_efficacy([1.0, 1.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        forget_efficacy([0.2, float("nan")])


# ------------------------------------------------------------------------------ CS and ES
def test_cosine_score_by_hand_and_clipping():
    assert cosine_score([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert cosine_score([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert cosine_score([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine_score([1.0, 0.0], [-1.0, 0.0]) == 0.0  # cos = -1 clipped
    assert cosine_score([0.0, 0.0], [1.0, 0.0]) == 0.0  # zero vector
    a = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [3.0, 4.0]])
    assert cosine_score(a, b) == pytest.approx([1.0, 0.0, 1.0])
    torch = pytest.importorskip("torch")
    assert cosine_score(torch.tensor(a), torch.tensor(b)) == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        cosine_score(a, b[:2])


def test_entailment_score():
    assert entailment_score([True, False, True, True]) == pytest.approx(0.75)
    assert entailment_score(["entailment", "neutral", "none", "ENTAILMENT"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        entailment_score([])


# ---------------------------------------------------------------------------- MIA by hand
def test_mia_scores_by_hand():
    lps = [-1.0, -2.0, -3.0, -4.0, -10.0]
    assert loss_score(lps) == pytest.approx(4.0)
    # k = 20 % of 5 tokens = 1 token: the lowest log-prob -10
    assert min_k_score(lps, 0.2) == pytest.approx(10.0)
    # k = 40 % -> two lowest: (-10, -4)
    assert min_k_score(lps, 0.4) == pytest.approx(7.0)
    # short sequence: at least one token
    assert min_k_score([-0.5, -1.5], 0.2) == pytest.approx(1.5)
    text = "hello hello hello"
    assert zlib_score(lps, text) == pytest.approx(4.0 / len(zlib.compress(text.encode())))
    s = mia_scores([lps, [-1.0]], [text, "x"])
    assert s["loss"] == pytest.approx([4.0, 1.0])
    assert s["min_k"] == pytest.approx([10.0, 1.0])
    with pytest.raises(ValueError):
        loss_score([])


def test_mia_auc_by_hand():
    # members have low loss, non-members high -> perfectly separated
    assert mia_auc([0.1, 0.2], [0.5, 0.6, 0.7]) == pytest.approx(1.0)
    assert mia_auc([0.5, 0.6], [0.1, 0.2]) == pytest.approx(0.0)
    assert mia_auc([0.3, 0.3], [0.3, 0.3]) == pytest.approx(0.5)  # ties count 1/2
    # members [1, 3], non-members [0, 2, 4]: #(n > m) = (2>1, 4>1, 4>3) = 3 of 6 pairs
    assert mia_auc([1.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)
    assert mia_auc([1.0, 3.0], [2.0, 2.0, 4.0]) == pytest.approx(4 / 6)
    rng = np.random.default_rng(1)
    m, n = rng.normal(size=30), rng.normal(0.7, size=40)
    brute = np.mean([(y > x) + 0.5 * (y == x) for x in m for y in n])
    assert mia_auc(m, n) == pytest.approx(brute)
    with pytest.raises(ValueError):
        mia_auc([], [1.0])


def test_mia_aucs_keys():
    out = mia_aucs([[-0.1, -0.2]], ["a"], [[-3.0, -4.0]], ["b"])
    assert out == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0}


# ------------------------------------------------------------------- forget quality from logs
def _fake_log(paras, perts):
    return {
        "avg_paraphrased_loss": {str(i): p for i, p in enumerate(paras)},
        "average_perturb_loss": {str(i): q for i, q in enumerate(perts)},
        "truth_ratio": {str(i): truth_ratio(p, q) for i, (p, q) in enumerate(zip(paras, perts))},
    }


def test_forget_quality_from_logs(tmp_path):
    a = _fake_log([1.0, 2.0, 3.0], [[2.0, 2.0], [2.0, 3.0], [1.0, 1.0]])
    b = _fake_log([5.0, 6.0, 7.0], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert truth_ratios_from_log(pa) == pytest.approx([math.exp(-1), math.exp(-0.5), math.exp(2)])
    expected = forget_quality(truth_ratios_from_log(a), truth_ratios_from_log(b))
    assert forget_quality_from_logs(pa, pb) == pytest.approx(expected)
    assert forget_quality_from_logs(pa, pa) == pytest.approx(1.0)
    # only the stored truth_ratio field
    only_tr = {"truth_ratio": a["truth_ratio"]}
    assert truth_ratios_from_log(only_tr) == pytest.approx(truth_ratios_from_log(a))
    # sample order follows the integer keys, not string order ("10" after "9")
    many = _fake_log([float(i) for i in range(12)], [[0.0]] * 12)
    many = {k: dict(sorted(v.items(), key=lambda kv: kv[0])) for k, v in many.items()}
    assert list(many["avg_paraphrased_loss"])[:3] == ["0", "1", "10"]
    assert truth_ratios_from_log(many) == pytest.approx([math.exp(i) for i in range(12)])
