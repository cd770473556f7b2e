"""Under ``protocol: seed`` raysweep computes what the paper's code computes.

The seed is sail-sg/closer-look-LLM-unlearning at b622294.  Every test writes the seed's
definition out itself (file and line in each docstring; nothing is imported from the seed) on a
hand-built batch and compares it with raysweep's function under ``protocol: seed``, to 1e-6.
docs/FIDELITY.md lists these tests item by item.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from raysweep.config import ExperimentConfig
from raysweep.data.formatting import encode_qa, format_answer, format_prompt
from raysweep.data.records import QARecord
from raysweep.data.unlearn_dataset import UnlearnDataset, collate_unlearn
from raysweep.losses import LossParams, compute_loss, kl_loss_seed, me_loss_seed
from raysweep.scenarios import idk_templates_for, load_run_data, resolve
from raysweep.train import plan_steps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEED_IDK = SHARED / "idontknow.jsonl"
SEED_IDK_SHA256 = "eb9a1e32a6f4112088306e1a65d297240f75513dd5223b2acb326454675fd605"


# ----------------------------------------------------------------------------- hand-built inputs


class CharTokenizer:
    """A tokenizer by hand: BOS, then one id per character; EOS and BOS are special."""

    bos_token, eos_token, pad_token = "<s>", "</s>", None
    bos_token_id, eos_token_id, pad_token_id = 1, 2, None
    chat_template = None

    def __call__(self, text, add_special_tokens=True, max_length=None, truncation=False):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [3 + ord(c) % 60 for c in text]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def tokenize(self, text, add_special_tokens=True):
        return self(text, add_special_tokens)["input_ids"]


class TableModel(torch.nn.Module):
    """Logits that depend only on (token id, position): fixed, hand-checkable, differentiable."""

    def __init__(self, vocab: int = 64, length: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = torch.randn(length, vocab, generator=g)

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass

        out = Out()
        out.logits = self.table[input_ids] + self.pos[: input_ids.shape[1]]
        return out


def seed_encode(tok, question: str, answer: str, max_length: int, mask: bool):
    """The seed's ``convert_raw_forget_data_to_model_format`` (dataset/data_module.py:24-54),
    with llama2's tags of config/model_config.yaml:4-6, written out again."""
    new_question = "[INST] " + question + " [/INST]"
    full_text = new_question + "" + answer
    num_question_tokens = len(tok.tokenize(new_question, add_special_tokens=True))
    encoded = tok(full_text, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    pad_length = max_length - len(encoded)
    pad_input_ids = encoded + [tok.eos_token_id] * pad_length
    pad_attention_mask = [1] * len(encoded) + [0] * pad_length
    if mask:
        label = list(encoded) if len(encoded) == max_length else encoded + [tok.eos_token_id] + [-100] * (pad_length - 1)
        for i in range(num_question_tokens):
            label[i] = -100
    else:
        label = pad_input_ids
    return pad_input_ids, label, pad_attention_mask


FORGET = [QARecord(question="Who wrote Zor?", answer="Ana Bel wrote it."),
          QARecord(question="Where is Qim?", answer="In the north.")]
RETAIN = [QARecord(question=f"Fact {i}?", answer=f"Answer {i} is here.") for i in range(5)]
MAX_LEN = 120


def seed_batch(templates=("I don't know.", "No idea.")):
    tok = CharTokenizer()
    ds = UnlearnDataset(FORGET, RETAIN, list(templates), tok, "llama2", MAX_LEN, pairing="seed")
    batch = collate_unlearn([ds[i] for i in range(len(ds))], tok.eos_token_id, length=MAX_LEN, seed_layout=True)
    return tok, ds, batch


# ----------------------------------------------------------------------------- items


def test_llama2_prompt_has_no_space_after_inst_and_llama3_matches_the_seed():
    """config/model_config.yaml:4-6 and :11-13: question_start_tag + q + question_end_tag +
    answer_tag ("") + answer."""
    q, a = "Who is X?", "X is Y."
    assert format_prompt(q, "llama2") + format_answer(a, "llama2") == "[INST] " + q + " [/INST]" + "" + a
    llama3 = ("<|start_header_id|>user<|end_header_id|>\n\n" + q
              + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + "" + a)
    assert format_prompt(q, "llama3") + format_answer(a, "llama3") == llama3
    tok = CharTokenizer()
    ex = encode_qa(tok, q, a, "llama2", MAX_LEN)
    assert ex["input_ids"][:-1] == tok("[INST] " + q + " [/INST]" + a)["input_ids"]


@pytest.mark.parametrize("mask", [False, True])
def test_training_layout_pads_to_max_length_like_the_seed(mask):
    """dataset/data_module.py:24-54: every sample padded to max_length with EOS, attention 0 on
    the padding (the appended EOS included), labels = answer + EOS (mask) or the padded ids."""
    tok, ds, batch = seed_batch()
    for i, r in enumerate(FORGET):
        ids, label, attention = seed_encode(tok, r.question, r.answer, MAX_LEN, mask=True)
        assert batch["forget"]["input_ids"][i].tolist() == ids
        assert batch["forget"]["attention_mask"][i].tolist() == attention
        assert batch["forget"]["labels"][i].tolist() == label
        if not mask:  # what the seed's ME sees as labels with mask: false
            assert seed_encode(tok, r.question, r.answer, MAX_LEN, mask=False)[1] == batch["forget"]["input_ids"][i].tolist()


def seed_me(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """trainer/losses.py:171-189, one position at a time in float64."""
    B, T, K = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            p = torch.softmax(logits[b, t].double(), dim=-1)
            total += sum((1.0 / K) * (math.log(1.0 / K) - math.log(float(p[k]) + 1e-12)) for k in range(K))
            count += 1
    return total / count


@pytest.mark.parametrize("mask_question", [False, True])
def test_me_reduction_matches_the_seed(mask_question):
    """ME+GD with mask: false averages over every position of the padded sequence (labels =
    padded ids); mask: true over answer positions.  log(softmax + 1e-12)."""
    tok, ds, batch = seed_batch()
    model = TableModel()
    forget = batch["forget"]
    logits = model(forget["input_ids"]).logits.detach()
    labels = forget["labels"] if mask_question else forget["input_ids"]
    want = seed_me(logits, labels)
    assert float(me_loss_seed(logits, labels)) == pytest.approx(want, abs=1e-6)
    params = LossParams(forget_coeff=1.0, reg_coeff=0.0, protocol="seed", me_mask_question=mask_question)
    loss, _ = compute_loss("ME+GD", model, batch, params)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    if not mask_question:  # padding really counts: most of these 119 positions are padding
        assert int((forget["attention_mask"] == 0).sum()) > forget["attention_mask"].numel() / 2
        raysweep = compute_loss("ME+GD", model, batch, LossParams(forget_coeff=1.0, reg_coeff=0.0))[0]
        assert abs(float(raysweep) - want) > 1e-3


def seed_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """trainer/losses.py:114-128: kl_div(log p, log p_ref, 'batchmean', log_target=True) on
    [B*T, K]: sum over all B*T rows of KL(ref || theta), divided by B*T."""
    B, T, K = logits.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            lp = torch.log_softmax(logits[b, t].double(), -1)
            lr = torch.log_softmax(ref_logits[b, t].double(), -1)
            total += sum(math.exp(float(lr[k])) * (float(lr[k]) - float(lp[k])) for k in range(K))
    return total / (B * T)


def test_kl_reduction_matches_the_seed():
    tok, ds, batch = seed_batch()
    model, ref = TableModel(seed=0), TableModel(seed=1)
    retain = batch["retain"]
    logits, ref_logits = model(retain["input_ids"]).logits.detach(), ref(retain["input_ids"]).logits.detach()
    want = seed_kl(logits, ref_logits)
    assert float(kl_loss_seed(logits, ref_logits)) == pytest.approx(want, abs=1e-6)
    loss, _ = compute_loss("GA+KL", model, batch, LossParams(forget_coeff=0.0, reg_coeff=1.0, protocol="seed"),
                           ref_model=ref)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("n, batch, accumulation, devices, epochs", [
    (40, 4, 4, 2, 5), (200, 4, 4, 2, 5), (400, 4, 4, 2, 5), (400, 4, 4, 1, 3), (100, 8, 1, 1, 1), (36, 2, 3, 2, 4),
])
def test_step_counts_match_the_seed(n, batch, accumulation, devices, epochs):
    """forget.py:118-125."""
    steps_per_epoch = n // (batch * accumulation * devices)
    max_steps = int(epochs * n) // (batch * accumulation * devices)
    warmup_steps = steps_per_epoch if steps_per_epoch > 1 else 0
    loader = math.ceil(math.ceil(n / devices) / batch)
    plan = plan_steps("seed", n, loader, batch, accumulation, devices, epochs)
    assert (plan.total_steps, plan.warmup_steps) == (max_steps, warmup_steps)
    steps = sum(plan.boundary(e, i) for e in range(1, epochs + 1) for i in range(loader) if plan.runs(e, i))
    assert steps == max_steps


@pytest.mark.skipif(not SEED_IDK.is_file(), reason="../shared/data/idontknow.jsonl is absent")
def test_rejection_templates_are_paired_like_the_seed():
    """dataset/data_module.py:96-98, 108-110, 125-126: torch.manual_seed(idx); retain_idx =
    (idx + randint(0, len(retain))) % len(retain); rand_pos = randint(0, len(idk)); the same
    idk[rand_pos].strip() answers both the forget and the retain question."""
    assert hashlib.sha256(SEED_IDK.read_bytes()).hexdigest() == SEED_IDK_SHA256
    cfg = ExperimentConfig.model_validate({"protocol": "seed", "data": {"idk_path": str(SEED_IDK)}})
    templates = idk_templates_for(cfg)
    with open(SEED_IDK) as f:
        idk = f.readlines()
    assert templates == [line.strip() for line in idk] and len(templates) == 100
    tok, ds, _ = seed_batch(templates)
    for idx in range(len(FORGET)):
        torch.manual_seed(idx)
        retain_idx = (idx + torch.randint(0, len(RETAIN), (1,)).item()) % len(RETAIN)
        rand_pos = torch.randint(0, len(idk), (1,)).item()
        pairing = ds.pairing(idx)
        assert pairing["retain"] == (RETAIN[retain_idx].question, RETAIN[retain_idx].answer)
        assert pairing["forget_idk"] == (FORGET[idx].question, idk[rand_pos].strip())
        assert pairing["retain_idk"] == (RETAIN[retain_idx].question, idk[rand_pos].strip())


def _write(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluation_set_sizes_follow_the_seed(tmp_path):
    """config/tofu.yaml:44 ds_size: 300 of every TOFU set (eval.py:126-132: the first 300);
    config/real_world.yaml:43 ds_size: null: every real-world question."""
    pert = {"paraphrased_answer": "p", "perturbed_answer": ["x", "y"]}
    rows = lambda prefix, n, **kw: [{"question": f"{prefix} {i}?", "answer": "a", **pert, **kw} for i in range(n)]  # noqa: E731
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    _write(tofu / "forget10.json", rows("f", 350, task_id=1))
    _write(tofu / "forget10_perturbed.json", rows("f", 350, task_id=1))
    _write(tofu / "retain90.json", rows("r", 400))
    _write(tofu / "retain_perturbed.json", rows("r", 400))
    _write(tofu / "real_authors_perturbed.json", rows("ra", 320))
    _write(tofu / "world_facts_perturbed.json", rows("wf", 310))
    idk = tmp_path / "idk.jsonl"
    idk.write_text("I don't know.\nNo idea.\n")  # so that protocol seed does not download
    doc = {"model": {"name_or_path": "some-org/model"}, "eval": {"max_samples": 50, "max_forget_samples": 20},
           "data": {"source": "local", "path": str(tofu), "idk_path": str(idk)}}
    for protocol, sizes in (("seed", [300, 300, 300, 300]), ("raysweep", [20, 50, 50, 50])):
        cfg = ExperimentConfig.model_validate({**doc, "protocol": protocol})
        sets = load_run_data(cfg, resolve(cfg)).eval_sets
        assert [len(sets[k].records) for k in ("forget", "retain", "real_authors", "world_facts")] == sizes
        assert sets["forget"].records[0].question == "f 0?"  # the first ones, as select(range(n))

    people = tmp_path / "rw"
    people.mkdir()
    names = lambda n: [f"Person {i // 20}" for i in range(n)]  # noqa: E731
    for split, n in (("forget", 400), ("neighbor", 400)):
        data = [{"question": f"{split} {i}?", "answer": "a", "golden_answer": "g", "name": nm, "task_id": 1, **pert}
                for i, nm in enumerate(names(n))]
        _write(people / f"{split}.json", data)
        _write(people / f"{split}_perturbed.json", data)
    cfg = ExperimentConfig.model_validate({
        "protocol": "seed", "scenario": "real_world", "model": {"name_or_path": "some-org/model"},
        "eval": {"max_forget_samples": 300},
        "data": {"source": "local", "path": str(people), "forget_split": "forget", "retain_split": "neighbor",
                 "task_ids": None, "idk_path": str(idk)}})
    assert len(load_run_data(cfg, resolve(cfg)).eval_sets["forget"].records) == 400
