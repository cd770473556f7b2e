"""Privacy metrics: TOFU forget quality from eval logs, and membership-inference attacks (MIA).

MIA scores are computed per sample from the token log-probs of the sample's label tokens
(``raysweep.eval.likelihood.answer_nlls`` returns them). Every score is oriented like a loss:
**higher = less likely a training member**. ``mia_auc(member, nonmember)`` is the area under the
ROC curve of that detector, i.e. ``P(score(nonmember) > score(member))`` (ties count 1/2):
0.5 = members and non-members are indistinguishable (the goal after unlearning, measured on the
forget set against a holdout set), 1.0 = members perfectly detected.
"""

from __future__ import annotations

import json
import zlib
from os import PathLike
from typing import Mapping, Sequence

import numpy as np

from raysweep.eval.metrics import forget_quality, truth_ratio

__all__ = [
    "truth_ratios_from_log",
    "forget_quality_from_logs",
    "loss_score",
    "zlib_score",
    "min_k_score",
    "mia_scores",
    "mia_auc",
    "mia_aucs",
    "MIA_ATTACKS",
]

MIA_ATTACKS = ("loss", "zlib", "min_k")


# ------------------------------------------------------------------ forget quality (TOFU logs)
def _load_log(log: str | PathLike | Mapping) -> Mapping:
    if isinstance(log, Mapping):
        return log
    with open(log, encoding="utf-8") as f:
        return json.load(f)


def _ordered_values(d: Mapping) -> list:
    """Per-sample dict keyed "0", "1", … (or a list) -> values in sample order."""
    if isinstance(d, Mapping):
        return [d[k] for k in sorted(d, key=lambda k: int(k))]
    return list(d)


def truth_ratios_from_log(log: str | PathLike | Mapping) -> list[float]:
    """Per-sample truth ratios of a TOFU-format eval log (a path or the loaded dict).

    Recomputed from ``avg_paraphrased_loss`` and ``average_perturb_loss`` as TOFU's
    ``get_forget_quality`` does; falls back to the stored ``truth_ratio`` field when the losses
    are absent.
    """
    d = _load_log(log)
    if "avg_paraphrased_loss" in d and "average_perturb_loss" in d:
        para = _ordered_values(d["avg_paraphrased_loss"])
        pert = _ordered_values(d["average_perturb_loss"])
        if len(para) != len(pert):
            raise ValueError(
                f"log has {len(para)} avg_paraphrased_loss but {len(pert)} average_perturb_loss"
            )
        return [truth_ratio(a, p) for a, p in zip(para, pert)]
    if "truth_ratio" in d:
        return [float(x) for x in _ordered_values(d["truth_ratio"])]
    raise KeyError("log has neither avg_paraphrased_loss/average_perturb_loss nor truth_ratio")


def forget_quality_from_logs(
    eval_log_forget_path: str | PathLike | Mapping,
    retain_eval_log_forget_path: str | PathLike | Mapping,
) -> float:
    """TOFU forget quality of the model that wrote ``eval_log_forget_path`` against the retain
    (gold-standard) model's forget-set log: KS-test p-value of the two truth-ratio samples."""
    return forget_quality(
        truth_ratios_from_log(eval_log_forget_path),
        truth_ratios_from_log(retain_eval_log_forget_path),
    )


# ------------------------------------------------------------------ membership inference
def _logprobs(token_logprobs: Sequence[float]) -> np.ndarray:
    lp = np.asarray(
        token_logprobs.detach().cpu().double().numpy()
        if hasattr(token_logprobs, "detach")
        else token_logprobs,
        dtype=np.float64,
    ).reshape(-1)
    if lp.size == 0:
        raise ValueError("MIA score of a sample with no tokens")
    if np.isnan(lp).any():
        raise ValueError("NaN token log-prob")
    return lp


def loss_score(token_logprobs: Sequence[float]) -> float:
    """LOSS attack (Yeom et al.): mean token NLL = ``-mean(log p)``."""
    return float(-_logprobs(token_logprobs).mean())


def zlib_score(token_logprobs: Sequence[float], text: str) -> float:
    """zlib attack (Carlini et al. 2021): mean token NLL / zlib-compressed byte length of
    ``text`` (the scored sequence's text)."""
    n = len(zlib.compress(text.encode("utf-8")))
    return loss_score(token_logprobs) / n


def min_k_score(token_logprobs: Sequence[float], k: float = 0.2) -> float:
    """Min-K% Prob attack (Shi et al. 2024): ``-mean`` of the lowest ``k`` fraction of the token
    log-probs (at least one token)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_score: k must be in (0, 1], got {k}")
    lp = np.sort(_logprobs(token_logprobs))
    m = max(1, int(len(lp) * k))
    return float(-lp[:m].mean())


def mia_scores(
    token_logprobs: Sequence[Sequence[float]], texts: Sequence[str], k: float = 0.2
) -> dict[str, list[float]]:
    """All attack scores for many samples: ``{"loss": [...], "zlib": [...], "min_k": [...]}``."""
    if len(token_logprobs) != len(texts):
        raise ValueError(f"{len(token_logprobs)} log-prob rows but {len(texts)} texts")
    return {
        "loss": [loss_score(lp) for lp in token_logprobs],
        "zlib": [zlib_score(lp, t) for lp, t in zip(token_logprobs, texts)],
        "min_k": [min_k_score(lp, k) for lp in token_logprobs],
    }


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of "higher score = non-member": ``P(s_nonmember > s_member) + P(tie)/2``.

    Mann–Whitney rank formula with mid-ranks for ties (equals sklearn's ``roc_auc_score`` with
    non-members labelled 1). 0.5 = indistinguishable.
    """
    from scipy.stats import rankdata

    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError("mia_auc needs at least one member and one non-member score")
    if np.isnan(m).any() or np.isnan(n).any():
        raise ValueError("mia_auc: NaN score")
    ranks = rankdata(np.concatenate([m, n]))  # average ranks for ties
    u = ranks[m.size :].sum() - n.size * (n.size + 1) / 2.0
    return float(u / (m.size * n.size))


def mia_aucs(
    member_logprobs: Sequence[Sequence[float]],
    member_texts: Sequence[str],
    nonmember_logprobs: Sequence[Sequence[float]],
    nonmember_texts: Sequence[str],
    k: float = 0.2,
) -> dict[str, float]:
    """AUC of every attack in ``MIA_ATTACKS`` (members e.g. the forget set, non-members a
    holdout set of the same distribution)."""
    ms = mia_scores(member_logprobs, member_texts, k)
    ns = mia_scores(nonmember_logprobs, nonmember_texts, k)
    return {name: mia_auc(ms[name], ns[name]) for name in MIA_ATTACKS}
