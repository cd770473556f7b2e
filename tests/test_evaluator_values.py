"""The Evaluator's numbers from hand-built inputs, no trained model: MU / FE / objective from a
known per-set metric table, the ES direction per set (through the Evaluator, with the tiny NLI
classifier of test_eval_generation), the references of the real-world scenario, and the
membership-inference AUCs of a separable and of an indistinguishable case.

Each expected value is computed here from its definition (README "Metrics", paper Appendix D),
so a wrong number fails, not only a number out of [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import hmean

from raysweep.config import EvalConfig, ExperimentConfig
from raysweep.data.records import QARecord
from raysweep.eval import evaluate as evaluate_module
from raysweep.eval.evaluate import Evaluator
from raysweep.eval.likelihood import AnswerNLL
from raysweep.eval.metrics import rouge_l_recall, token_entropy, truth_ratio, truth_ratio_score
from raysweep.eval.privacy import mia_aucs
from raysweep.scenarios import EvalSet

from test_eval_generation import ID2LABEL, _save_tiny_nli


def _cfg(**eval_values) -> ExperimentConfig:
    values = dict(embedding_model=None, nli_model=None, forget_quality=False, privacy=False)
    values.update(eval_values)
    return ExperimentConfig(eval=EvalConfig(**values))


def _record(i: int = 0, **fields) -> QARecord:
    row = dict(question=f"Question {i}?", answer=f"Answer {i}.", paraphrased_answer=f"Paraphrase {i}.",
               perturbed_answer=(f"Wrong {i} a.", f"Wrong {i} b."))
    row.update(fields)
    return QARecord(**row)


def _sets(names_forget_style: list[tuple[str, bool, str]]) -> dict[str, EvalSet]:
    return {name: EvalSet(name, [_record()], is_forget, style) for name, is_forget, style in names_forget_style}


def _with_table(evaluator: Evaluator, table: dict[str, dict[str, float]]) -> Evaluator:
    """Per-set metrics come from ``table`` instead of a model: only the aggregation runs."""
    like = {"probabilities": [0.5], "truth_ratios": [1.0], "token_logprobs": [[-1.0]]}
    evaluator.evaluate_set = lambda model, tokenizer, eval_set: (dict(table[eval_set.name]), [], like)
    return evaluator


TOFU_SETS = [("forget", True, "tofu"), ("retain", False, "tofu"), ("real_authors", False, "general"),
             ("world_facts", False, "general")]
TABLE = {
    "forget": {"R": 0.9, "P": 0.8, "TR": 0.3, "TE": 0.05, "CS": 0.7, "ES": 0.6},
    "retain": {"R": 0.5, "P": 0.4, "TR": 0.6, "TE": 0.9, "CS": 0.8, "ES": 0.5},
    "real_authors": {"R": 0.7, "P": 0.45, "TR": 0.55, "TE": 0.95, "CS": 0.65, "ES": 0.35},
    "world_facts": {"R": 0.85, "P": 0.5, "TR": 0.6, "TE": 0.9, "CS": 0.75, "ES": 0.4},
}


def test_mu_fe_objective_from_a_known_table():
    evaluator = _with_table(Evaluator(_cfg(), _sets(TOFU_SETS), log=lambda m: None), TABLE)
    evaluator.dropped = []  # the table has CS and ES: nothing dropped
    out, _ = evaluator(None, None)
    utility = [TABLE[s][k] for s in ("retain", "real_authors", "world_facts") for k in ("R", "P", "TR", "TE", "CS", "ES")]
    assert len(utility) == 18  # TE is part of MU
    # by hand: 18 / sum(1/v) (harmonic mean), and FE = 1 - mean of the forget set's R, P, TR, CS, ES
    mu = 18 / sum(1 / v for v in utility)
    fe = 1 - (0.9 + 0.8 + 0.3 + 0.7 + 0.6) / 5
    assert out["MU"] == pytest.approx(mu, rel=1e-12) and out["MU"] == pytest.approx(hmean(utility), rel=1e-12)
    assert out["FE"] == pytest.approx(0.34, abs=1e-12) and out["FE"] == pytest.approx(fe, abs=1e-12)
    assert out["objective"] == pytest.approx((mu + fe) / 2, rel=1e-12)
    assert out["forget/TE"] == 0.05 and out["retain/ES"] == 0.5  # every per-set value logged as is
    assert not any(k.startswith("eval/") for k in out)


def test_a_dropped_es_is_left_out_of_mu_and_fe():
    table = {name: {k: v for k, v in row.items() if k != "ES"} for name, row in TABLE.items()}
    evaluator = _with_table(Evaluator(_cfg(), _sets(TOFU_SETS), log=lambda m: None), table)
    evaluator.dropped = ["ES"]
    out, _ = evaluator(None, None)
    utility = [TABLE[s][k] for s in ("retain", "real_authors", "world_facts") for k in ("R", "P", "TR", "TE", "CS")]
    assert out["MU"] == pytest.approx(hmean(utility), rel=1e-12)
    assert out["FE"] == pytest.approx(1 - (0.9 + 0.8 + 0.3 + 0.7) / 4, abs=1e-12)  # not / 5, no ES = 0
    assert out["eval/ES_dropped"] == 1.0 and "forget/ES" not in out


def test_real_world_mu_is_the_neighbor_set_only():
    sets = _sets([("forget", True, "real_world"), ("neighbor", False, "real_world")])
    table = {"forget": TABLE["forget"], "neighbor": TABLE["retain"]}
    evaluator = _with_table(Evaluator(_cfg(), sets, log=lambda m: None), table)
    evaluator.dropped = []
    out, _ = evaluator(None, None)
    assert out["MU"] == pytest.approx(6 / sum(1 / v for v in TABLE["retain"].values()), rel=1e-12)
    assert out["FE"] == pytest.approx(0.34, abs=1e-12)
    assert set(k.split("/")[0] for k in out if "/" in k) == {"forget", "neighbor"}


# ------------------------------------------------------------------ a model-free Evaluator pass


class WordTokenizer:
    """Just what the Evaluator asks of a tokenizer once generation and likelihoods are faked."""

    pad_token_id = 0
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return list(range(len(text.split())))

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


class RecordingEmbedder:
    """CS = 1 for a generation equal to its reference, else 0; keeps the references it got."""

    def __init__(self):
        self.references: list[str] = []

    def cosine_similarities(self, generations, references):
        self.references += list(references)
        return [1.0 if g == r else 0.0 for g, r in zip(generations, references)]


NLL = {}  # answer text -> avg NLL, read by the fake answer_nlls


def _fake_pass(monkeypatch, evaluator: Evaluator, generations: dict[str, str]):
    """Generation by question from ``generations``; each encoded answer's avg NLL from ``NLL``
    (1.0 for any text not listed)."""
    evaluator._generate = lambda model, tokenizer, records: [generations[r.question] for r in records]
    evaluator._encode = lambda tokenizer, question, answer: {"answer": answer}
    encoded: list[str] = []

    def answer_nlls(model, examples, batch_size, pad_id):
        encoded.extend(e["answer"] for e in examples)
        return [AnswerNLL(NLL.get(e["answer"], 1.0), 0.0, 1, [-NLL.get(e["answer"], 1.0)]) for e in examples]

    monkeypatch.setattr(evaluate_module, "answer_nlls", answer_nlls)
    return encoded


@pytest.fixture(scope="module")
def entailing_nli(tmp_path_factory):
    """The tiny NLI classifier, saved with its top label forced to entailment for every pair."""
    from transformers import BertForSequenceClassification

    path = _save_tiny_nli(tmp_path_factory.mktemp("nli_entails"), ID2LABEL)
    model = BertForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[0] = 10.0  # "entailment"
    model.save_pretrained(path)
    return str(path)


def _recording_pipe(evaluator: Evaluator) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    real = evaluator.nli.pipe

    def pipe(inputs, **kwargs):
        pairs.extend((x["text"], x["text_pair"]) for x in inputs)
        return real(inputs, **kwargs)

    evaluator.nli.pipe = pipe
    return pairs


def test_es_direction_per_set_through_the_evaluator(monkeypatch, entailing_nli):
    """Forget: generation => answer; retain and general sets: answer (general: original_answer)
    => generation (the seed's get_entailment_results); a pair with ROUGE-L recall < 0.1 is not
    entailed and never reaches the NLI model."""
    sets = {
        "forget": EvalSet("forget", [_record(0, answer="Mira Holt wrote the silver lantern."),
                                     _record(1, answer="Mira Holt was born in Oslo.")], True, "tofu"),
        "retain": EvalSet("retain", [_record(2, answer="Jon Vale paints blue ships.")], False, "tofu"),
        "world_facts": EvalSet("world_facts", [_record(3, answer="Paris",
                                                       original_answer="The capital of France is Paris.")],
                               False, "general"),
    }
    generations = {
        "Question 0?": "Mira Holt wrote the silver lantern in winter.",  # R = 1: sent to NLI
        "Question 1?": "I do not know.",  # R = 0 < 0.1: not entailed, not sent
        "Question 2?": "Jon Vale paints blue ships daily.",
        "Question 3?": "Paris is the capital.",
    }
    evaluator = Evaluator(_cfg(nli_model=entailing_nli, nli_batch_size=4), sets, log=lambda m: None)
    pairs = _recording_pipe(evaluator)
    _fake_pass(monkeypatch, evaluator, generations)
    out, samples = evaluator(None, WordTokenizer())
    assert pairs == [
        ("Mira Holt wrote the silver lantern in winter.", "Mira Holt wrote the silver lantern."),  # gen => answer
        ("Jon Vale paints blue ships.", "Jon Vale paints blue ships daily."),  # answer => gen
        ("The capital of France is Paris.", "Paris is the capital."),  # original_answer => gen
    ]
    assert [row["ES"] for row in samples["forget"]] == [True, False]
    assert out["forget/ES"] == 0.5 and out["retain/ES"] == 1.0 and out["world_facts/ES"] == 1.0
    assert "eval/ES_dropped" not in out


def test_real_world_scores_r_p_tr_es_against_golden_and_cs_against_answer(monkeypatch, entailing_nli):
    golden = "Ada Quill was born in Lyon."
    reply = "Ada Quill, the painter, was born in the city of Lyon in France in 1950."  # the model's own
    record = QARecord(question="Where was Ada Quill born?", answer=reply, golden_answer=golden,
                      paraphrased_answer="Lyon is where Ada Quill was born.",
                      perturbed_answer=("Ada Quill was born in Nice.", "Ada Quill was born in Metz."))
    neighbor = QARecord(question="Where was Bo Reed born?", answer="Bo Reed was born in Porto, they say.",
                        golden_answer="Bo Reed was born in Porto.", paraphrased_answer="Porto.",
                        perturbed_answer=("Bo Reed was born in Faro.",))
    sets = {"forget": EvalSet("forget", [record], True, "real_world"),
            "neighbor": EvalSet("neighbor", [neighbor], False, "real_world")}
    NLL.clear()
    NLL.update({golden: 0.2, reply: 3.0, record.paraphrased_answer: 0.5, "Ada Quill was born in Nice.": 1.5,
                "Ada Quill was born in Metz.": 2.5, neighbor.golden_answer: 0.4, neighbor.answer: 2.0,
                "Porto.": 0.3, "Bo Reed was born in Faro.": 1.3})
    generation = "Ada Quill was born in Lyon."  # = golden_answer, far from the reply
    evaluator = Evaluator(_cfg(nli_model=entailing_nli), sets, log=lambda m: None)
    evaluator.embedder, evaluator.dropped = RecordingEmbedder(), []
    pairs = _recording_pipe(evaluator)
    encoded = _fake_pass(monkeypatch, evaluator, {record.question: generation, neighbor.question: "Bo Reed was born in Porto."})
    out, samples = evaluator(None, WordTokenizer())

    assert out["forget/R"] == 1.0 and rouge_l_recall(generation, reply) < 1.0  # R against golden_answer
    assert samples["forget"][0]["ground_truth"] == golden
    assert out["forget/P"] == pytest.approx(math.exp(-0.2))  # P of golden_answer (exp(-3.0) for the reply)
    assert encoded[:4] == [golden, record.paraphrased_answer, *record.perturbed_answer] and reply not in encoded
    assert out["forget/TR"] == pytest.approx(truth_ratio_score([truth_ratio(0.5, [1.5, 2.5])], forget=True))
    assert evaluator.embedder.references == [reply, neighbor.answer]  # CS against answer
    assert out["forget/CS"] == 0.0 and out["neighbor/CS"] == 0.0
    # ES: generation => golden_answer on both real-world sets (the seed's non-TOFU branch)
    assert pairs == [(generation, golden), ("Bo Reed was born in Porto.", neighbor.golden_answer)]
    assert out["forget/ES"] == 1.0
    assert out["forget/TE"] == pytest.approx(token_entropy([f"t{i}" for i in range(6)]))
    assert out["neighbor/P"] == pytest.approx(math.exp(-0.4))
    assert out["neighbor/TR"] == pytest.approx(truth_ratio_score([truth_ratio(0.3, [1.3])], forget=False))
    fe = 1 - np.mean([out[f"forget/{k}"] for k in ("R", "P", "TR", "CS", "ES")])
    assert out["FE"] == pytest.approx(fe)


# ------------------------------------------------------------------ membership inference


def test_privacy_aucs_separable_is_one_and_identical_is_half():
    texts = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]
    members = [[-0.01, -0.02, -0.01], [-0.02, -0.01, -0.03], [-0.01, -0.01, -0.02]]  # memorised
    nonmembers = [[-4.0, -5.0, -3.5], [-6.0, -4.5, -5.5], [-3.9, -4.2, -5.1]]  # unseen
    separable = mia_aucs(members, texts, nonmembers, texts)
    assert separable == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0}
    identical = mia_aucs(members, texts, members, texts)
    assert identical == {"loss": 0.5, "zlib": 0.5, "min_k": 0.5}
    flipped = mia_aucs(nonmembers, texts, members, texts)  # members look unseen: AUC 0
    assert flipped == {"loss": 0.0, "zlib": 0.0, "min_k": 0.0}
