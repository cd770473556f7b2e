"""Unlearning objectives: forget losses, regularizers, and the registry that composes them.

Equations follow "A Closer Look at Machine Unlearning for LLMs" (Yuan et al., ICLR 2025) and the
conventions of its official code.  Notation used in every docstring below:

* ``x_f, y_f``: a forget question and its answer; ``x_r, y_r``: a retain question and answer;
  ``idk``: a rejection template ("I don't know ...") paired with a question.
* ``NLL(x, y) = -log p(y|x) = sum_t CE(y_t)``: the **summed** cross-entropy over the answer
  tokens (``labels != -100``, which includes the final EOS label).  See ``sequence_nll``.
* ``CE(x, y)``: the token-mean cross-entropy over all answer tokens of a batch, i.e. what
  ``model(**ex).loss`` returns in Hugging Face.  See ``mean_ce``.
* Causal LM shift: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
* ``sigma`` is the logistic sigmoid; ``beta`` the inverse temperature (default 0.1).

The total training loss is ``alpha * forget_loss + gamma * reg_loss`` (``LossParams.forget_coeff``
and ``LossParams.reg_coeff``).

Layout: pure loss functions over tensors (testable by hand), then ``LossSpec`` objects that pair
each pure function with an adapter running the forward passes it needs on a batch, the registries
``FORGET_LOSSES`` / ``REGULARIZERS``, ``parse_method`` and ``compute_loss``.  A method is composed
by name ("NPO+GD"), never by a class per combination.

Batch layout (from ``raysweep.data.unlearn_dataset.collate_unlearn``): ``batch["forget"]``,
``batch["forget_idk"]``, ``batch["retain"]``, ``batch["retain_idk"]`` are dicts of LongTensors
``input_ids``, ``attention_mask``, ``labels``; ``batch["index"]`` holds the forget indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from raysweep.data.formatting import IGNORE_INDEX  # the one definition (label ignored by the loss)

ME_DIVERGENCES = ("code", "paper")
PROTOCOLS = ("raysweep", "seed")
# Reference log-prob keys: batch part -> name in the ``ref_logps`` dict.
REF_LOGP_NAMES = {"forget": "forget_nll", "forget_idk": "forget_idk_nll"}


# ---------------------------------------------------------------------------------------------
# Token-level helpers
# ---------------------------------------------------------------------------------------------


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy ``[B, T-1]`` of ``labels[:, 1:]`` under ``logits[:, :-1]``.

    Ignored positions (``labels == -100``) are 0.  Computed in float32.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """``NLL(x, y) = -log p(y|x) = sum_t -log p(y_t | x, y_<t)`` per example, shape ``[B]``.

    Summed (not averaged) over the answer tokens, as in the seed code's ``get_batch_loss``.
    """
    return token_nll(logits, labels).sum(dim=-1)


def mean_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean cross-entropy over every answer token of the batch (HF ``model(**ex).loss``)."""
    return F.cross_entropy(
        logits[:, :-1, :].float().flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="mean",
    )


def _prediction_mask(attention_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """Mask ``[B, T-1]`` of prediction positions ``t`` whose input ``t`` and target ``t+1`` are
    both real tokens (works for right and left padding)."""
    if attention_mask is None:
        return torch.ones(shape[0], shape[1] - 1, dtype=torch.bool)
    am = attention_mask.bool()
    return am[:, :-1] & am[:, 1:]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.device, values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Forget losses (pure)
# ---------------------------------------------------------------------------------------------


def ga_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Gradient Ascent, Eq. (1): ``L_GA = -CE(x_f, y_f)``.

    Minimizing it maximizes the token-mean cross-entropy of the forget answers.
    ``logits``/``labels`` are the forward pass on the forget pair ``(x_f, y_f)``.
    """
    return -mean_ce(logits, labels)


def npo_loss(nll_theta: Tensor, nll_ref: Tensor, beta: float) -> Tensor:
    """Negative Preference Optimization, Eq. (2).

    ``L_NPO = -(2/beta) * mean_i log sigma(-beta * log(p_theta(y_f|x_f) / p_ref(y_f|x_f)))
            = -(2/beta) * mean_i log sigma(beta * (NLL_theta(x_f, y_f) - NLL_ref(x_f, y_f)))``

    ``nll_theta``, ``nll_ref``: summed answer NLLs ``[B]`` under the current and reference model.
    At ``theta == ref`` the loss is ``(2/beta) log 2``; it falls as ``NLL_theta`` rises.
    """
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_theta - nll_ref)).mean()


def idk_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """IDK fine-tuning, Eq. (3): ``L_IDK = CE(x_f, idk)``.

    Token-mean cross-entropy of a rejection template answering the forget question;
    ``logits``/``labels`` are the forward pass on the ``forget_idk`` pair.
    """
    return mean_ce(logits, labels)


def dpo_loss(
    nll_theta_idk: Tensor,
    nll_theta_answer: Tensor,
    nll_ref_idk: Tensor,
    nll_ref_answer: Tensor,
    beta: float,
) -> Tensor:
    """DPO with the rejection template preferred over the true answer (Rafailov et al. 2023,
    as used for unlearning in TOFU and the seed code).

    ``L_DPO = -(2/beta) * mean_i log sigma(beta * [ (log p_theta(idk|x_f) - log p_theta(y_f|x_f))
                                                   - (log p_ref(idk|x_f) - log p_ref(y_f|x_f)) ])``

    with summed log-probs ``log p = -NLL``.  Inputs are the four ``[B]`` summed NLLs.
    The ``2/beta`` scale follows the seed code.
    """
    pi_logratio = nll_theta_answer - nll_theta_idk  # log p_theta(idk|x) - log p_theta(y|x)
    ref_logratio = nll_ref_answer - nll_ref_idk  # log p_ref(idk|x) - log p_ref(y|x)
    return -(2.0 / beta) * F.logsigmoid(beta * (pi_logratio - ref_logratio)).mean()


def me_loss(
    logits: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    mask_question: bool = False,
    divergence: str = "code",
) -> Tensor:
    """Maximizing Entropy, Eq. (6): push every next-token distribution towards uniform.

    ``L_ME = mean_t KL(P_t || U_K)`` over the prediction positions of ``x' = x_f ∘ y_f``
    (question **and** answer), ``P_t = softmax(logits[:, t])``, ``U_K`` uniform over the vocabulary
    of size ``K``.  Two divergences:

    * ``divergence="paper"``: ``KL(P || U) = log K - H(P)`` (paper, Appendix B).
    * ``divergence="code"`` (default, seed code): ``KL(U || P) = -log K - (1/K) sum_k log P_k``.

    Both are 0 exactly when ``P`` is uniform and positive otherwise.

    Positions: ``t`` such that input ``t`` and target ``t+1`` are real tokens (``attention_mask``);
    padding is excluded (the seed code's unmasked ME also averaged over EOS-padding positions).
    With ``mask_question=True`` only positions whose target is an answer label
    (``labels[:, t+1] != -100``) count, which needs ``labels``.
    The seed code takes ``log(softmax + 1e-12)``; here ``log_softmax`` (same value, stabler).
    """
    if divergence not in ME_DIVERGENCES:
        raise ValueError(f"me divergence must be one of {ME_DIVERGENCES}, got {divergence!r}")
    num_classes = logits.shape[-1]
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    if divergence == "code":
        per_position = -math.log(num_classes) - logp.mean(dim=-1)
    else:
        per_position = math.log(num_classes) + (logp.exp() * logp).sum(dim=-1)
    mask = _prediction_mask(attention_mask, logits.shape[:2]).to(logits.device)
    if mask_question:
        if labels is None:
            raise ValueError("me_loss(mask_question=True) needs labels")
        mask = mask & (labels[:, 1:] != IGNORE_INDEX)
    return _masked_mean(per_position, mask)


SEED_ME_EPS = 1e-12  # trainer/losses.py:185 of the seed code: log(softmax + 1e-12)


def me_loss_seed(logits: Tensor, labels: Tensor) -> Tensor:
    """Maximizing Entropy, Eq. (6), exactly as the seed code computes it (``get_me_loss``,
    ``trainer/losses.py:171-189``)::

        L_ME = sum_{b,t} m_{b,t} KL(U_K || P_{b,t}) / sum_{b,t} m_{b,t}
        KL(U_K || P) = sum_k (1/K) (log(1/K) - log(P_k + 1e-12)),   P_{b,t} = softmax(logits[b, t])
        m_{b,t} = [labels[b, t + 1] != -100],   t = 0 .. T-2

    With the seed's ``mask: false`` (its ME+GD setting) ``labels`` are the input ids padded to
    ``max_length`` (``dataset/data_module.py:51-52``), so every position of the padded sequence
    counts, padding included: pass ``input_ids``.  With ``mask: true`` pass the answer labels.
    The ε inside the log (not ``log_softmax``) is the seed's.
    """
    num_classes = logits.shape[-1]
    probs = F.softmax(logits[:, :-1, :].float(), dim=-1)
    log_p = (probs + SEED_ME_EPS).log()
    per_position = ((1.0 / num_classes) * (math.log(1.0 / num_classes) - log_p)).sum(dim=-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return (per_position * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------
# Regularizers (pure)
# ---------------------------------------------------------------------------------------------


def gd_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Gradient Descent on the retain set, Eq. (4): ``L_GD = CE(x_r, y_r)``."""
    return mean_ce(logits, labels)


def kl_loss(logits: Tensor, ref_logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """KL regularizer, Eq. (5): ``L_KL = mean_t KL(P_ref(.|x_<=t) || P_theta(.|x_<=t))`` on the
    retain pair ``x_r ∘ y_r``.

    ``KL(P_ref || P_theta) = sum_k P_ref,k (log P_ref,k - log P_theta,k)`` per position.

    Positions: the same prediction positions as ``me_loss`` — ``t`` whose input ``t`` and next
    token ``t+1`` are both real (``attention_mask``), i.e. every next-token prediction of a real
    token of question and answer, averaged over positions of the whole batch.  The seed code
    instead averages over all ``B*T`` positions including padding (``kl_div(...,
    reduction="batchmean")`` on the flattened logits), which dilutes the term by the padding
    fraction of each batch; excluding padding keeps its scale independent of batch padding.
    """
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits[:, :-1, :].float(), dim=-1)
    per_position = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    mask = _prediction_mask(attention_mask, logits.shape[:2]).to(logits.device)
    return _masked_mean(per_position, mask)


def kl_loss_seed(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL regularizer, Eq. (5), exactly as the seed code computes it (``kl_loss``,
    ``trainer/losses.py:114-128``: ``kl_div(log p_theta, log p_ref, reduction='batchmean',
    log_target=True)`` on logits flattened to ``[B*T, K]``)::

        L_KL = (1 / (B*T)) sum_{b,t} sum_k P_ref,k (log P_ref,k - log P_theta,k)

    over every position ``t = 0 .. T-1`` of the batch (no causal shift; padding to
    ``max_length`` included), ``P = softmax(logits[b, t])``.
    """
    logp = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1).flatten(0, 1)
    return (ref_logp.exp() * (ref_logp - logp)).sum() / logp.shape[0]


def ap_loss(nll_idk: Tensor, nll_answer: Tensor, beta: float) -> Tensor:
    """Answer Preservation, Eq. (8): on retain questions prefer the true answer over a rejection.

    ``L_AP = -(1/beta) * mean_i log sigma(beta * (NLL_theta(x_r, idk) - NLL_theta(x_r, y_r)))``
           ``= -(1/beta) * mean_i log sigma(beta * log(p_theta(y_r|x_r) / p_theta(idk|x_r)))``

    No reference model.  Gradient, Eq. (9), per example:

    ``grad L_AP = -W * (grad log p(y_r|x_r) - grad log p(idk|x_r))``,
    ``W = 1 - sigma(beta (NLL_idk - NLL_y)) = 1 / (1 + (p(y_r|x_r) / p(idk|x_r))**beta)``
    (see ``ap_weight``): a descent step raises ``p(y_r|x_r)`` and lowers ``p(idk|x_r)``, and
    weighs an example more the more the model already prefers the rejection.
    """
    return -(1.0 / beta) * F.logsigmoid(beta * (nll_idk - nll_answer)).mean()


def ap_weight(nll_idk: Tensor, nll_answer: Tensor, beta: float) -> Tensor:
    """The per-example weight ``W = 1 / (1 + (p(y|x)/p(idk|x))**beta)`` of Eq. (9), ``[B]``."""
    return torch.sigmoid(-beta * (nll_idk - nll_answer))


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossParams:
    """Hyperparameters of the loss: ``loss = forget_coeff * forget + reg_coeff * reg``.

    ``beta``: NPO/DPO/AP inverse temperature.  ``me_divergence``: "code" (``KL(U||P)``, seed code)
    or "paper" (``KL(P||U)``).  ``me_mask_question``: ME over answer positions only.
    ``protocol``: "raysweep" (``me_loss`` / ``kl_loss`` over real tokens) or "seed"
    (``me_loss_seed`` / ``kl_loss_seed``: the seed code's reductions, padding included).
    """

    forget_coeff: float = 1.0
    reg_coeff: float = 1.0
    beta: float = 0.1
    me_divergence: str = "code"
    me_mask_question: bool = False
    protocol: str = "raysweep"  # "seed": ME and KL reduced as the seed code does

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.me_divergence not in ME_DIVERGENCES:
            raise ValueError(
                f"me_divergence must be one of {ME_DIVERGENCES}, got {self.me_divergence!r}"
            )


# ---------------------------------------------------------------------------------------------
# Forward passes of one step (memoized) and reference log-probs
# ---------------------------------------------------------------------------------------------


def _part(batch: Mapping, key: str) -> Mapping[str, Tensor]:
    try:
        return batch[key]
    except KeyError:
        raise KeyError(f"batch has no {key!r} part (has {sorted(batch)})") from None


def _forward_logits(model: torch.nn.Module, part: Mapping[str, Tensor]) -> Tensor:
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


PADDING_SIDES = ("right", "left")


def fused_logits(
    model: torch.nn.Module, parts: list[Mapping[str, Tensor]], padding_side: str = "right"
) -> list[Tensor]:
    """One forward over several batch parts stacked into one batch; each part's logits back.

    The parts are padded to the widest one on their own padding side (attention 0; the ids of
    the added columns are never attended to and their logits are cut off again), concatenated
    along the batch, run once, and split back to each part's own ``[B_i, T_i, V]``. Right
    padding: a causal model's logits at the real positions do not depend on columns after them.
    Left padding: the added columns shift every real token right, so ``position_ids`` are passed
    to give each token the position it has in its own part (what a forward of that part alone
    uses: ``0 .. T_i - 1`` over the padded row). The losses therefore see the same logits as
    from one forward per part (to float rounding), from a single, larger forward.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    width = max(p["input_ids"].shape[1] for p in parts)
    extras = [width - p["input_ids"].shape[1] for p in parts]
    ids, masks = [], []
    for part, extra in zip(parts, extras):
        pad = (extra, 0) if padding_side == "left" else (0, extra)
        ids.append(F.pad(part["input_ids"], pad, value=0))
        masks.append(F.pad(part["attention_mask"], pad, value=0))
    inputs = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    if padding_side == "left":
        device = inputs["input_ids"].device
        shift = torch.cat([torch.full((p["input_ids"].shape[0],), e, dtype=torch.long) for p, e in zip(parts, extras)])
        positions = torch.arange(width, device=device)[None, :] - shift.to(device)[:, None]
        inputs["position_ids"] = positions.clamp_min(0)
    logits = model(**inputs).logits
    out, row = [], 0
    for part, extra in zip(parts, extras):
        rows, length = part["input_ids"].shape
        block = logits[row : row + rows]
        out.append(block[:, extra:] if padding_side == "left" else block[:, :length])
        row += rows
    return out


class StepForward:
    """The forward passes one training step needs, each run at most once.

    Adapters ask for ``logits(key)``, ``nll(key)`` (current model), ``ref_nll(key)`` (looked up
    in the precomputed ``ref_logps`` by ``batch["index"]``, or computed with ``ref_model``) and
    ``ref_logits(key)`` (``ref_model`` under ``no_grad``).  ``prefetch(keys)`` /
    ``prefetch_ref(keys)`` run the parts a step will ask for in one forward (:func:`fused_logits`)
    beforehand; a part not prefetched gets its own forward on first use.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Mapping,
        params: LossParams,
        ref_model: torch.nn.Module | None = None,
        ref_logps: Mapping[str, Tensor] | None = None,
        padding_side: str = "right",
    ) -> None:
        self.model, self.batch, self.params = model, batch, params
        self.ref_model, self.ref_logps = ref_model, ref_logps
        self.padding_side = padding_side
        self._logits: dict[str, Tensor] = {}
        self._ref_logits: dict[str, Tensor] = {}

    def prefetch(self, keys: Iterable[str]) -> None:
        """The current model's logits of ``keys``, from one forward over all of them."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._logits]
        if len(missing) > 1:
            logits = fused_logits(self.model, [self.part(k) for k in missing], self.padding_side)
            self._logits.update(zip(missing, logits))

    def prefetch_ref(self, keys: Iterable[str]) -> None:
        """The reference model's logits of ``keys`` (no grad), from one forward over all of them."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._ref_logits]
        if self.ref_model is not None and len(missing) > 1:
            with torch.no_grad():
                logits = fused_logits(self.ref_model, [self.part(k) for k in missing], self.padding_side)
            self._ref_logits.update((k, v.detach()) for k, v in zip(missing, logits))

    def part(self, key: str) -> Mapping[str, Tensor]:
        return _part(self.batch, key)

    def labels(self, key: str) -> Tensor:
        return self.part(key)["labels"]

    def attention_mask(self, key: str) -> Tensor:
        return self.part(key)["attention_mask"]

    def logits(self, key: str) -> Tensor:
        if key not in self._logits:
            self._logits[key] = _forward_logits(self.model, self.part(key))
        return self._logits[key]

    def nll(self, key: str) -> Tensor:
        return sequence_nll(self.logits(key), self.labels(key))

    def ref_logits(self, key: str) -> Tensor:
        if self.ref_model is None:
            raise ValueError(f"reference logits of {key!r} need ref_model")
        if key not in self._ref_logits:
            with torch.no_grad():
                self._ref_logits[key] = _forward_logits(self.ref_model, self.part(key)).detach()
        return self._ref_logits[key]

    def ref_nll(self, key: str) -> Tensor:
        name = REF_LOGP_NAMES[key]
        if self.ref_logps is not None:
            if name not in self.ref_logps:
                raise KeyError(f"ref_logps has no {name!r} (has {sorted(self.ref_logps)})")
            table = self.ref_logps[name]
            index = self.batch.get("index")
            if index is None:
                raise KeyError("batch has no 'index'; needed to look up ref_logps")
            value = table[index.to(table.device)]
        elif self.ref_model is not None:
            value = sequence_nll(self.ref_logits(key), self.labels(key))
        else:
            raise ValueError(f"reference NLL of {key!r} needs ref_logps or ref_model")
        return value.to(device=self.labels(key).device, dtype=torch.float32)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, batch: Mapping, keys: Iterable[str] = ("forget", "forget_idk")
) -> dict[str, Tensor]:
    """Summed answer NLLs ``[B]`` of the reference model: ``{"forget_nll", "forget_idk_nll"}``.

    ``NLL_ref(x_f, y_f)`` (NPO, DPO) and ``NLL_ref(x_f, idk)`` (DPO).  Runs under ``no_grad`` in
    eval mode (dropout off; the previous mode is restored).  ``keys`` picks the parts
    (``Method.ref_logp_keys`` lists only those a method needs); several parts run in one
    forward (:func:`fused_logits`, right padding as ``collate_unlearn`` pads).
    """
    keys = tuple(keys)
    parts = [_part(batch, key) for key in keys]
    was_training = model.training
    model.eval()
    try:
        logits = fused_logits(model, parts) if len(parts) > 1 else [_forward_logits(model, parts[0])]
        return {REF_LOGP_NAMES[key]: sequence_nll(lg, part["labels"]).float()
                for key, part, lg in zip(keys, parts, logits)}
    finally:
        model.train(was_training)


def collect_reference_logps(
    model: torch.nn.Module,
    batches: Iterable[Mapping],
    num_examples: int,
    keys: Iterable[str] = ("forget", "forget_idk"),
) -> dict[str, Tensor]:
    """Run ``reference_logps`` over the whole forget set once, before training.

    Returns full-length CPU float32 tensors ``[num_examples]`` indexed by ``batch["index"]``, the
    ``ref_logps`` that ``compute_loss`` takes.  ``batches`` must cover every forget index (under
    data parallelism, iterate the full set on every rank, not the rank's shard); the pairing of
    forget ``i`` with its rejection template must be fixed for the run (it is: seeded by index).
    """
    keys = tuple(keys)
    out = {REF_LOGP_NAMES[k]: torch.full((num_examples,), float("nan")) for k in keys}
    for batch in batches:
        index = batch["index"].cpu()
        for name, value in reference_logps(model, batch, keys).items():
            out[name][index] = value.cpu()
    for name, table in out.items():
        missing = torch.isnan(table).nonzero().flatten()
        if len(missing):
            raise ValueError(
                f"reference log-probs {name!r} missing for {len(missing)} of {num_examples} "
                f"forget examples (first: {missing[:5].tolist()})"
            )
    return out


def me_term(step: StepForward) -> Tensor:
    """The ME forget term of a step under ``step.params.protocol`` (see ``me_loss`` and
    ``me_loss_seed``; the seed's ``mask: false`` counts every position: ``input_ids`` as labels)."""
    p, part = step.params, step.part("forget")
    if p.protocol == "seed":
        return me_loss_seed(step.logits("forget"), part["labels"] if p.me_mask_question else part["input_ids"])
    return me_loss(step.logits("forget"), part["attention_mask"], part["labels"],
                   mask_question=p.me_mask_question, divergence=p.me_divergence)


def kl_term(step: StepForward) -> Tensor:
    """The KL regularizer of a step under ``step.params.protocol`` (``kl_loss`` / ``kl_loss_seed``)."""
    if step.params.protocol == "seed":
        return kl_loss_seed(step.logits("retain"), step.ref_logits("retain"))
    return kl_loss(step.logits("retain"), step.ref_logits("retain"), step.attention_mask("retain"))


# ---------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """One named loss: the pure function, the adapter that feeds it a batch, and its needs."""

    name: str
    fn: Callable[..., Tensor]
    adapter: Callable[[StepForward], Tensor]
    batch_keys: tuple[str, ...]
    ref_logp_keys: tuple[str, ...] = ()
    needs_ref_model: bool = False
    uses_beta: bool = False  # the loss reads ``LossParams.beta`` (so the sweep searches β)

    @property
    def needs_ref_logps(self) -> bool:
        return bool(self.ref_logp_keys)

    def __call__(self, step: StepForward) -> Tensor:
        return self.adapter(step)


FORGET_LOSSES: dict[str, LossSpec] = {
    "GA": LossSpec(
        "GA", ga_loss, lambda s: ga_loss(s.logits("forget"), s.labels("forget")), ("forget",)
    ),
    "NPO": LossSpec(
        "NPO",
        npo_loss,
        lambda s: npo_loss(s.nll("forget"), s.ref_nll("forget"), s.params.beta),
        ("forget",),
        ref_logp_keys=("forget",),
        uses_beta=True,
    ),
    "DPO": LossSpec(
        "DPO",
        dpo_loss,
        lambda s: dpo_loss(
            s.nll("forget_idk"),
            s.nll("forget"),
            s.ref_nll("forget_idk"),
            s.ref_nll("forget"),
            s.params.beta,
        ),
        ("forget", "forget_idk"),
        ref_logp_keys=("forget", "forget_idk"),
        uses_beta=True,
    ),
    "IDK": LossSpec(
        "IDK",
        idk_loss,
        lambda s: idk_loss(s.logits("forget_idk"), s.labels("forget_idk")),
        ("forget_idk",),
    ),
    "ME": LossSpec(
        "ME",
        me_loss,
        me_term,
        ("forget",),
    ),
}

REGULARIZERS: dict[str, LossSpec] = {
    "GD": LossSpec(
        "GD", gd_loss, lambda s: gd_loss(s.logits("retain"), s.labels("retain")), ("retain",)
    ),
    "KL": LossSpec(
        "KL",
        kl_loss,
        kl_term,
        ("retain",),
        needs_ref_model=True,
    ),
    "AP": LossSpec(
        "AP",
        ap_loss,
        lambda s: ap_loss(s.nll("retain_idk"), s.nll("retain"), s.params.beta),
        ("retain", "retain_idk"),
        uses_beta=True,
    ),
}

# The 11 combinations evaluated in the paper.
METHODS: tuple[str, ...] = (
    "GA+GD",
    "GA+KL",
    "NPO+GD",
    "NPO+KL",
    "DPO+GD",
    "DPO+KL",
    "IDK+GD",
    "ME+GD",
    "IDK+AP",
    "ME+KL",
    "DPO+AP",
)

# The paper's default hyperparameters (Yuan et al., Appendix), the first points a sweep tries
# (``search.enqueue_defaults``); a method's own entry overrides the common ones.
PAPER_DEFAULTS: dict[str, float] = {"forget_coeff": 1.0, "reg_coeff": 1.0, "beta": 0.1}
PAPER_METHOD_DEFAULTS: dict[str, dict[str, float]] = {"ME+GD": {"forget_coeff": 0.1}}


@dataclass(frozen=True)
class Method:
    """A forget loss plus an optional regularizer, e.g. ``parse_method("ME+GD")``."""

    forget: LossSpec
    regularizer: LossSpec | None = None

    @property
    def name(self) -> str:
        return self.forget.name + (f"+{self.regularizer.name}" if self.regularizer else "")

    def __str__(self) -> str:
        return self.name

    @property
    def _specs(self) -> tuple[LossSpec, ...]:
        return (self.forget,) + ((self.regularizer,) if self.regularizer else ())

    @property
    def ref_logp_keys(self) -> tuple[str, ...]:
        """Batch parts whose reference NLLs must be precomputed (``reference_logps(keys=...)``)."""
        return tuple(dict.fromkeys(k for s in self._specs for k in s.ref_logp_keys))

    @property
    def needs_ref_logps(self) -> bool:
        """NPO, DPO: reference sequence log-probs on the forget (and IDK) pairs."""
        return bool(self.ref_logp_keys)

    @property
    def needs_ref_model(self) -> bool:
        """KL: a frozen reference model during training (per-token distributions)."""
        return any(s.needs_ref_model for s in self._specs)

    @property
    def uses_beta(self) -> bool:
        """β matters only for the NPO / DPO forget losses and the AP regularizer."""
        return any(s.uses_beta for s in self._specs)

    @property
    def paper_defaults(self) -> dict[str, float]:
        """The paper's default ``forget_coeff``, ``reg_coeff`` and ``beta`` of this method."""
        return {**PAPER_DEFAULTS, **PAPER_METHOD_DEFAULTS.get(self.name, {})}

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch parts the method reads."""
        return tuple(dict.fromkeys(k for s in self._specs for k in s.batch_keys))

    @property
    def needs_idk(self) -> bool:
        """Whether rejection templates are used (IDK, DPO, AP)."""
        return any(k.endswith("_idk") for k in self.batch_keys)

    @property
    def needs_retain(self) -> bool:
        return any(k.startswith("retain") for k in self.batch_keys)


def _invalid(name: object) -> ValueError:
    return ValueError(
        f"unknown unlearning method {name!r}: expected FORGET or FORGET+REGULARIZER with "
        f"FORGET in {sorted(FORGET_LOSSES)} and REGULARIZER in {sorted(REGULARIZERS)}; "
        f"the paper's methods are {', '.join(METHODS)}"
    )


def parse_method(name: str | Method) -> Method:
    """``"NPO+GD"`` -> ``Method(FORGET_LOSSES["NPO"], REGULARIZERS["GD"])``; ``"GA"`` -> no
    regularizer.  Case-insensitive; ``_`` is accepted for ``+`` (seed code spelling "ME_GD")."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise _invalid(name)
    parts = [p.strip().upper() for p in name.replace("_", "+").split("+")]
    if len(parts) > 2 or parts[0] not in FORGET_LOSSES:
        raise _invalid(name)
    if len(parts) == 2 and parts[1] not in REGULARIZERS:
        raise _invalid(name)
    return Method(FORGET_LOSSES[parts[0]], REGULARIZERS[parts[1]] if len(parts) == 2 else None)


# ---------------------------------------------------------------------------------------------
# The training loss
# ---------------------------------------------------------------------------------------------


def compute_loss(
    method: str | Method,
    model: torch.nn.Module,
    batch: Mapping,
    params: LossParams | None = None,
    ref_model: torch.nn.Module | None = None,
    ref_logps: Mapping[str, Tensor] | None = None,
    *,
    fuse: bool = True,
    padding_side: str = "right",
    as_tensors: bool = False,
) -> tuple[Tensor, dict[str, float]] | tuple[Tensor, dict[str, Tensor]]:
    """``loss = forget_coeff * forget_loss + reg_coeff * reg_loss`` for one batch.

    ``ref_logps``: full-length tensors (``collect_reference_logps``) indexed by
    ``batch["index"]``, for NPO/DPO.  ``ref_model``: a frozen reference model, required by KL; if
    ``ref_logps`` is not given it also serves NPO/DPO (computed on the fly under ``no_grad``).
    Runs only the parts the method needs; a term whose coefficient is exactly 0 is skipped
    (logged as 0.0).  ``fuse`` (default): every part the current model sees runs in **one**
    forward (:func:`fused_logits`, the parts padded to a common width on ``padding_side``, the
    side ``collate_unlearn`` pads: right), and likewise the reference model's parts; same loss
    and gradients as one forward per part (``fuse=False``), to float rounding.  Every method
    of the registry fuses: all of a method's parts go through the same policy model, and no
    loss couples examples across parts.  Returns ``(loss, parts)`` with ``loss``,
    ``forget_loss``, ``reg_loss``: floats, or with ``as_tensors`` detached 0-d tensors on the
    loss's device (no host synchronisation; the training loop sums them on the device).
    """
    method = parse_method(method)
    params = params or LossParams()
    if method.needs_ref_logps and ref_logps is None and ref_model is None:
        raise ValueError(
            f"{method.name} needs reference log-probs of {list(method.ref_logp_keys)}: pass "
            "ref_logps (see collect_reference_logps) or ref_model"
        )
    if method.needs_ref_model and ref_model is None:
        raise ValueError(f"{method.name} needs ref_model (a frozen copy of the initial model)")

    step = StepForward(model, batch, params, ref_model=ref_model, ref_logps=ref_logps, padding_side=padding_side)
    if fuse:
        running = [spec for spec, coeff in ((method.forget, params.forget_coeff), (method.regularizer, params.reg_coeff))
                   if spec is not None and coeff != 0]
        step.prefetch(k for spec in running for k in spec.batch_keys)
        step.prefetch_ref(
            [k for spec in running if spec.needs_ref_model for k in spec.batch_keys]
            + ([k for spec in running for k in spec.ref_logp_keys] if ref_logps is None else [])
        )
    forget = method.forget(step) if params.forget_coeff != 0 else None
    reg = method.regularizer(step) if method.regularizer and params.reg_coeff != 0 else None

    terms = []
    if forget is not None:
        terms.append(params.forget_coeff * forget)
    if reg is not None:
        terms.append(params.reg_coeff * reg)
    if not terms:
        raise ValueError("forget_coeff and reg_coeff are both 0: the loss would be constant")
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    zero = torch.zeros((), device=loss.device)
    parts = {
        "loss": loss.detach(),
        "forget_loss": forget.detach().float() if forget is not None else zero,
        "reg_loss": reg.detach().float() if reg is not None else zero,
    }
    if as_tensors:
        return loss, parts
    return loss, {k: float(v) for k, v in parts.items()}
