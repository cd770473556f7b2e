"""Pure metric functions of the unlearning evaluation (no model, no I/O).

Definitions follow TOFU (Maini et al. 2024) and "A Closer Look at Machine Unlearning for LLMs"
(Yuan et al., ICLR 2025):

* ``R``  ROUGE-L recall of a greedy generation against the ground-truth answer.
* ``P``  answer probability ``exp(-mean token NLL)``; on sets with perturbed (wrong) answers the
  multiple-choice normalisation ``p_true / (p_true + sum p_perturbed)``.
* ``TR`` truth ratio ``exp(avg_nll(paraphrased) - mean(avg_nll(perturbed)))``; a set-level score
  turns it into "higher is better knowledge" (retain-type) or "higher is more forgetting"
  (forget set).
* ``TE`` normalised unigram token entropy of a generation (low = repetitive / degenerate).
* ``CS`` cosine similarity of sentence embeddings, clipped at 0.
* ``ES`` fraction of (premise, hypothesis) pairs an NLI model labels "entailment".
* ``FQ`` forget quality: KS-test p-value between truth-ratio distributions.
* ``MU`` harmonic mean of the utility metrics, ``FE`` one minus the mean of forget metrics.

Every function takes plain numbers / sequences / arrays (torch tensors are accepted where
embeddings are expected) and returns Python floats.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

__all__ = [
    "rouge_l_recall",
    "normalized_probability",
    "multiple_choice_probability",
    "truth_ratio",
    "truth_ratio_score",
    "token_entropy",
    "forget_quality",
    "model_utility",
    "forget_efficacy",
    "cosine_score",
    "entailment_score",
]


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generation: str, reference: str) -> float:
    """ROUGE-L recall of ``generation`` against ``reference`` (Porter stemming, as TOFU).

    ``RougeScorer(['rougeL'], use_stemmer=True).score(target=reference, prediction=generation)``.
    """
    return float(_rouge_l_scorer().score(reference, generation)["rougeL"].recall)


def normalized_probability(avg_nll: float) -> float:
    """Length-normalised answer probability ``exp(-avg_nll)`` (avg_nll = mean token NLL)."""
    return float(math.exp(-float(avg_nll)))


def multiple_choice_probability(true_avg_nll: float, perturbed_avg_nlls: Sequence[float]) -> float:
    """``p_true / (p_true + sum_i p_pert_i)`` with ``p = exp(-avg_nll)``.

    Computed as a softmax over ``-avg_nll`` (log-sum-exp), so very large NLLs do not underflow
    to 0/0.
    """
    pert = [float(x) for x in perturbed_avg_nlls]
    neg = np.array([-float(true_avg_nll)] + [-x for x in pert], dtype=np.float64)
    _check_finite(neg, "multiple_choice_probability")
    m = neg.max()
    if not math.isfinite(m):
        raise ValueError(f"multiple_choice_probability: no finite NLL in {(-neg).tolist()}")
    log_z = m + math.log(float(np.exp(neg - m).sum()))
    return float(math.exp(neg[0] - log_z))


def truth_ratio(paraphrased_avg_nll: float, perturbed_avg_nlls: Sequence[float]) -> float:
    """TOFU's per-sample truth ratio ``exp(avg_nll_para - mean_i avg_nll_pert_i)``.

    With length-normalised probabilities ``p = exp(-avg_nll)`` this is the geometric mean of the
    perturbed answers' ``p`` divided by the paraphrased answer's ``p`` — the ``truth_ratio``
    field of TOFU's eval logs. < 1 means the model prefers the correct (paraphrased) answer.
    """
    pert = [float(x) for x in perturbed_avg_nlls]
    if not pert:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return float(math.exp(float(paraphrased_avg_nll) - math.fsum(pert) / len(pert)))


def truth_ratio_score(ratios: Sequence[float], forget: bool) -> float:
    """Set-level truth-ratio metric (Yuan et al. / TOFU aggregation).

    * retain-type sets (``forget=False``): ``mean(max(0, 1 - TR))`` — high when the model
      prefers correct answers;
    * forget set (``forget=True``): ``1 - mean(min(TR, 1/TR))`` — high when the model is far
      from indifferent between correct and perturbed answers (same orientation as the other
      forget-set metrics that ``forget_efficacy`` turns into FE).
    """
    tr = _as_float_array(ratios, "truth_ratio_score")
    if np.any(tr < 0):
        raise ValueError("truth ratios must be non-negative")
    if forget:
        # min(TR, 1/TR) == exp(-|log TR|); TR == 0 gives 0 without a division warning.
        with np.errstate(divide="ignore"):
            sym = np.exp(-np.abs(np.log(tr)))
        return float(1.0 - sym.mean())
    return float(np.maximum(0.0, 1.0 - tr).mean())


def token_entropy(tokens: Sequence[str]) -> float:
    """Normalised unigram entropy of one generation's tokens.

    ``H = -sum_t f_t log2 f_t`` over the unigram frequencies ``f_t``, divided by ``log2(n)`` with
    ``n`` the number of tokens (not of distinct tokens); ``0.0`` when ``n <= 1``. All-distinct
    tokens give 1, one token repeated gives 0.
    """
    toks = list(tokens)
    n = len(toks)
    if n <= 1:
        return 0.0
    _, counts = np.unique(np.array(toks, dtype=object).astype(str), return_counts=True)
    f = counts / n
    h = float(-(f * np.log2(f)).sum())
    return max(0.0, h / math.log2(n))


def forget_quality(
    unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]
) -> float:
    """TOFU forget quality: p-value of the two-sample KS test (``scipy.stats.ks_2samp``, default
    method) between the unlearned model's and the retain model's forget-set truth ratios.

    TOFU feeds the raw per-sample ratios (its ``get_forget_quality`` uses
    ``exp(perturbed - paraphrased)`` = 1/TR; the KS statistic is rank-based, so TR and 1/TR give
    the same p-value). Not ``min(TR, 1/TR)``.
    """
    from scipy.stats import ks_2samp

    a = _as_float_array(unlearned_truth_ratios, "forget_quality")
    b = _as_float_array(retain_truth_ratios, "forget_quality")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the utility metrics (``scipy.stats.hmean``).

    A 0 value makes the result 0; NaN or negative values raise ``ValueError`` (never dropped).
    """
    from scipy.stats import hmean

    v = _as_float_array(values, "model_utility")
    if np.any(v < 0):
        raise ValueError(f"model_utility: negative value in {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(hmean(v))


def forget_efficacy(values: Sequence[float]) -> float:
    """``1 - mean(values)`` of the forget-set metrics (NaN raises ``ValueError``)."""
    v = _as_float_array(values, "forget_efficacy")
    return float(1.0 - v.mean())


def objective(mu: float, fe: float, *extra: float) -> float:
    """The sweep's objective, maximised: ``(MU + FE) / 2``.

    ``extra`` scores (the downstream tasks with ``eval.objective_includes_downstream``) join the
    mean: ``(MU + FE + d_1 + … + d_k) / (2 + k)``.
    """
    values = [float(mu), float(fe), *(float(x) for x in extra)]
    return sum(values) / len(values)


def cosine_score(a_emb: Any, b_emb: Any) -> float | list[float]:
    """``max(0, cos(a, b))`` per pair.

    1-D inputs (one embedding each) give a float; 2-D inputs ``(n, d)`` give a list of ``n``
    floats (row i of ``a`` against row i of ``b``). Accepts numpy arrays, lists or torch tensors.
    A zero vector has cosine 0.
    """
    a = _to_numpy(a_emb)
    b = _to_numpy(b_emb)
    if a.shape != b.shape:
        raise ValueError(f"cosine_score: shape mismatch {a.shape} vs {b.shape}")
    single = a.ndim == 1
    if single:
        a, b = a[None, :], b[None, :]
    if a.ndim != 2:
        raise ValueError(f"cosine_score: expected 1-D or 2-D embeddings, got shape {a.shape}")
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    out = np.clip(cos, 0.0, 1.0)  # clip at 0; upper clip removes 1 + 1e-16 rounding
    if single:
        return float(out[0])
    return [float(x) for x in out]


def entailment_score(labels: Sequence[bool | str]) -> float:
    """Fraction of pairs labelled entailment. Labels are booleans, or label strings compared
    case-insensitively with ``"entailment"``."""
    labs = list(labels)
    if not labs:
        raise ValueError("entailment_score of an empty label list")
    hits = sum(
        (lab.strip().lower() == "entailment") if isinstance(lab, str) else bool(lab) for lab in labs
    )
    return hits / len(labs)


# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_float_array(values: Sequence[float] | Any, what: str) -> np.ndarray:
    arr = _to_numpy(list(values) if not hasattr(values, "shape") else values).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    _check_finite(arr, what)
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    if np.isnan(arr).any():
        raise ValueError(f"{what}: NaN in input {arr.tolist()}")
