"""Batched answer likelihoods: per example the NLL of the label tokens given the prompt.

Used for P (``exp(-avg_nll)``), TR (paraphrased vs perturbed answers) and the MIA scores (token
log-probs). Examples are ``{"input_ids", "labels"}`` dicts as produced by
``raysweep.data.formatting.encode_qa`` (labels ``-100`` on the prompt; answer tokens then EOS),
or ``(prompt_ids, answer_ids)`` pairs. They are sorted by length, RIGHT-padded into one batch per
chunk (one forward pass per chunk, no per-example model call) and returned in input order.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from raysweep.data.formatting import IGNORE_INDEX, pad_batch
from raysweep.eval.generation import model_device

__all__ = ["AnswerNLL", "answer_nlls", "IGNORE_INDEX"]  # IGNORE_INDEX: raysweep.data.formatting's


class AnswerNLL(NamedTuple):
    """One example's answer likelihood (a tuple: ``avg, total, n, lps = result``)."""

    avg_nll: float  # mean NLL over the label tokens (TOFU's avg_gt_loss / avg_paraphrased_loss)
    sum_nll: float  # summed NLL (TOFU's gt_loss / paraphrased_loss)
    n_tokens: int  # number of label tokens (TOFU's num_token_*)
    token_logprobs: list[float]  # log p of each label token, in order (for MIA)


def _as_example(ex: Any, i: int) -> tuple[list[int], list[int]]:
    if isinstance(ex, Mapping):
        ids = [int(t) for t in ex["input_ids"]]
        labels = [int(t) for t in ex["labels"]]
        if len(ids) != len(labels):
            raise ValueError(f"example {i}: {len(ids)} input_ids but {len(labels)} labels")
    else:
        prompt, answer = ex
        prompt = [int(t) for t in prompt]
        answer = [int(t) for t in answer]
        ids = prompt + answer
        labels = [IGNORE_INDEX] * len(prompt) + answer
    # labels[t] is predicted from position t-1: the first position can never be scored
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        raise ValueError(f"example {i} has no scorable label tokens (empty answer?)")
    return ids, labels


@torch.no_grad()
def answer_nlls(
    model: Any,
    examples: Sequence[Mapping[str, Sequence[int]] | tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    pad_id: int,
) -> list[AnswerNLL]:
    """Per-example answer NLLs, in the order of ``examples``.

    The loss is the causal-LM cross-entropy of every position whose label is not ``-100``
    (``labels[t]`` predicted from position ``t-1``, as HF's shifted loss; a label at position 0
    cannot be scored and is ignored), computed in float32 from the model's logits. Padding is
    on the right with ``attention_mask = 0``, so results equal the unbatched ones up to float
    rounding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parsed = [_as_example(ex, i) for i, ex in enumerate(examples)]
    if not parsed:
        return []
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        order = sorted(range(len(parsed)), key=lambda i: len(parsed[i][0]), reverse=True)
        results: list[AnswerNLL | None] = [None] * len(parsed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([{"input_ids": parsed[i][0], "labels": parsed[i][1]} for i in idx], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            shift_labels = batch["labels"][:, 1:].to(logits.device)
            mask = shift_labels != IGNORE_INDEX
            # only the label positions are upcast to float32 (answers are a fraction of tokens)
            token_nll = F.cross_entropy(
                logits[:, :-1, :][mask].float(), shift_labels[mask], reduction="none"
            )
            counts = mask.sum(-1).tolist()
            pieces = torch.split(token_nll.double().cpu(), counts)
            for i, piece in zip(idx, pieces):
                total = float(piece.sum())
                n = int(piece.numel())
                results[i] = AnswerNLL(total / n, total, n, (-piece).tolist())
        return results  # type: ignore[return-value]
    finally:
        model.train(was_training)
