"""Conformance of the metric code with TOFU's published per-sample eval logs (Llama2-7B).

Reads ``../shared/reference/tofu_eval_logs`` beside the checkout; skips when absent.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from raysweep.eval.metrics import forget_quality, rouge_l_recall, truth_ratio
from raysweep.eval.privacy import forget_quality_from_logs, truth_ratios_from_log

LOGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tofu_eval_logs"
MODELS = ("full", "retain90", "retain95", "retain99")
FILES = (
    "eval_log_forget.json",
    "eval_log.json",
    "eval_real_author_wo_options.json",
    "eval_real_world_wo_options.json",
)
# TOFU's published forget quality of the fine-tuned (never unlearned) Llama2-7B on forget10.
FULL_VS_RETAIN90_FQ = 1.834e-21

pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"TOFU reference logs absent: {LOGS}")


@lru_cache(maxsize=None)
def _log(model: str, name: str) -> dict:
    path = LOGS / f"llama2-7b_{model}" / name
    if not path.is_file():
        pytest.skip(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _keys(d: dict) -> list[str]:
    keys = sorted(d, key=int)
    assert keys == [str(i) for i in range(len(keys))]
    return keys


def test_rouge_l_recall_reproduces_every_stored_value():
    """Every stored ``rougeL_recall`` of the full and retain90 logs, from the stored
    (generation, ground truth) pairs, to 1e-9."""
    n = 0
    worst = 0.0
    for model in ("full", "retain90"):
        for name in FILES:
            d = _log(model, name)
            for k in _keys(d["generated_text"]):
                _prompt, generation, ground_truth = d["generated_text"][k][:3]
                diff = abs(rouge_l_recall(generation, ground_truth) - d["rougeL_recall"][k])
                worst = max(worst, diff)
                assert diff <= 1e-9, (model, name, k, generation, ground_truth)
                n += 1
    # 2 models x (300 forget10 + 300 retain + 100 real authors + 117 world facts)
    assert n == 2 * (300 + 300 + 100 + 117) == 1634
    assert worst <= 1e-9


def _tr_cases(models, names):
    for model in models:
        for name in names:
            d = _log(model, name)
            for k in _keys(d["truth_ratio"]):
                yield (
                    model,
                    name,
                    k,
                    d["avg_paraphrased_loss"][k],
                    d["average_perturb_loss"][k],
                    d["truth_ratio"][k],
                )


def test_truth_ratio_reproduces_stored_values_to_1e6():
    """TOFU forget10 and retain logs (TR <= 3.7): every stored ``truth_ratio`` to 1e-6
    absolute (observed max 7.8e-7 over all four models)."""
    n = 0
    for model, name, k, para, pert, stored in _tr_cases(
        MODELS, ("eval_log_forget.json", "eval_log.json")
    ):
        assert len(pert) == 5
        assert abs(truth_ratio(para, pert) - stored) <= 1e-6, (model, name, k)
        n += 1
    assert n == 300 + 300 + (200 + 300) + (40 + 300) + 300 + 300


def test_truth_ratio_reproduces_all_stored_values_to_float32_rounding():
    """All 2,908 stored ratios, including real authors / world facts (3 perturbed answers,
    TR up to 34, where 1e-6 *absolute* does not hold: observed abs diff up to 1.9e-5).

    TOFU computed the ratio in float32; the stored value differs from the exact
    ``exp(para - mean(pert))`` of the stored inputs by float32 rounding of that computation.
    Bound, per sample: ``|ln ours - ln stored| <= eps32 * (|para| + max|pert|)`` (observed
    worst: 0.84 of the bound; relative diff <= 1.3e-6 overall).
    """
    eps32 = float(np.finfo(np.float32).eps)
    n = 0
    for model, name, k, para, pert, stored in _tr_cases(MODELS, FILES):
        ours = truth_ratio(para, pert)
        bound = eps32 * (abs(para) + max(abs(p) for p in pert))
        assert abs(math.log(ours) - math.log(stored)) <= bound, (model, name, k, ours, stored)
        n += 1
    assert n == 4 * (300 + 100 + 117) + 300 + 300 + 200 + 40 == 2908


def test_forget_quality_full_vs_retain90():
    """The fine-tuned model's forget quality on forget10 against the retain90 model: 1.834e-21.

    TOFU feeds the raw per-sample truth ratios (its code uses exp(perturbed - paraphrased) =
    1/TR, same KS p-value) to ``scipy.stats.ks_2samp`` with the default (exact) method;
    ``min(TR, 1/TR)`` would give 7.38e-15 and the asymptotic method 8.50e-22.
    """
    full = LOGS / "llama2-7b_full" / "eval_log_forget.json"
    retain = LOGS / "llama2-7b_retain90" / "eval_log_forget.json"
    fq = forget_quality_from_logs(full, retain)
    assert fq == pytest.approx(FULL_VS_RETAIN90_FQ, rel=1e-3)
    # same value from the stored truth_ratio fields and from 1/TR
    stored_full = [_log("full", FILES[0])["truth_ratio"][str(i)] for i in range(300)]
    stored_ret = [_log("retain90", FILES[0])["truth_ratio"][str(i)] for i in range(300)]
    assert forget_quality(stored_full, stored_ret) == pytest.approx(fq, rel=1e-9)
    inv = forget_quality(
        [1 / t for t in truth_ratios_from_log(full)], [1 / t for t in truth_ratios_from_log(retain)]
    )
    assert inv == pytest.approx(fq, rel=1e-9)
    # a model compared with itself is indistinguishable
    assert forget_quality_from_logs(retain, retain) == pytest.approx(1.0)
