"""Evaluation of unlearned models.

``metrics`` (pure metric functions), ``privacy`` (forget quality, membership inference),
``generation`` (batched greedy decoding), ``likelihood`` (batched answer NLLs), ``semantic``
(sentence-embedding cosine similarity, NLI entailment). Importing this package imports only the
pure modules; the model-side modules (torch, transformers) load when imported explicitly.
"""

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

__all__ = [
    "cosine_score",
    "entailment_score",
    "forget_efficacy",
    "forget_quality",
    "model_utility",
    "multiple_choice_probability",
    "normalized_probability",
    "rouge_l_recall",
    "token_entropy",
    "truth_ratio",
    "truth_ratio_score",
]
