"""Prompt formats, label masking, padding, and the unlearning dataset / collator."""

from functools import partial

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from raysweep.data.formatting import (PROMPT_TEMPLATES, encode_prompt, encode_qa, format_answer,
                                      format_prompt, pad_batch)
from raysweep.data.records import QARecord
from raysweep.data.templates import UNLEARN_TEMPLATES
from raysweep.data.unlearn_dataset import PAIR_KEYS, UnlearnDataset, collate_unlearn

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
QUESTION, ANSWER = "Where was Kalo Rima born?", "Kalo Rima was born in Lisbon, Portugal."


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained on a few sentences (adds BOS, like Llama)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"Question: {QUESTION}\nAnswer: {ANSWER}", "I don't know.",
                             "[INST] Who wrote it? [/INST] Nobody."] * 3, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = CHAT_TEMPLATE
    return t


def test_prompt_formats(tok):
    assert format_prompt("Q?", "plain") == "Question: Q?\nAnswer:"
    assert format_prompt("Q?", "llama2") == "[INST] Q? [/INST]"
    assert format_prompt("Q?", "llama3") == ("<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
                                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert format_prompt("Q?", "chat_template", tok) == "<s><|user|>\nQ?\n<|assistant|>\n"
    assert format_answer("A.", "plain") == " A."
    # TOFU / the seed train on "[INST] q [/INST]answer": no space after [/INST] (answer_tag "").
    assert format_answer("A.", "llama2") == format_answer("A.", "llama3") == format_answer("A.", "chat_template") == "A."
    with pytest.raises(ValueError, match="'alpaca'"):
        format_prompt("Q?", "alpaca")
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt("Q?", "chat_template")


@pytest.mark.parametrize("template", PROMPT_TEMPLATES)
def test_encode_qa_masks_prompt(tok, template):
    ex = encode_qa(tok, QUESTION, ANSWER, template, max_length=512)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt = encode_prompt(tok, QUESTION, template)
    assert len(ids) == len(labels)
    assert ids[:len(prompt)] == prompt and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert labels[:len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == labels[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[len(prompt):-1]) == format_answer(ANSWER, template)
    assert tok.decode(prompt, skip_special_tokens=False).endswith(format_prompt(QUESTION, template, tok)[-8:])


class _MergingTokenizer:
    """Characters as ids, except that ": " is one token: tokenizing prompt + answer does not start
    with the prompt's own ids, so ``encode_qa`` must tokenize the answer on its own."""

    bos_token, eos_token, bos_token_id, eos_token_id = "<s>", "</s>", 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text.replace(": ", "\x00")]
        ids = [999 if i == 0 else i for i in ids]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_encode_qa_falls_back_when_boundary_merges():
    tok = _MergingTokenizer()
    ex = encode_qa(tok, "Q?", "A.", "plain", max_length=64)
    prompt = [1] + [ord(c) for c in "Question"] + [999] + [ord(c) for c in "Q?\nAnswer:"]
    assert ex["input_ids"] == prompt + [ord(" "), ord("A"), ord("."), 2]
    assert ex["labels"] == [-100] * len(prompt) + [ord(" "), ord("A"), ord("."), 2]


def test_encode_qa_truncates_keeping_eos(tok):
    full = encode_qa(tok, QUESTION, ANSWER, "plain", max_length=512)
    cut = encode_qa(tok, QUESTION, ANSWER, "plain", max_length=len(full["input_ids"]) - 3)
    assert len(cut["input_ids"]) == len(full["input_ids"]) - 3
    assert cut["input_ids"][:-1] == full["input_ids"][:len(cut["input_ids"]) - 1]
    assert cut["input_ids"][-1] == cut["labels"][-1] == tok.eos_token_id
    tiny = encode_qa(tok, QUESTION, ANSWER, "plain", max_length=4)
    assert len(tiny["input_ids"]) == 4 and tiny["labels"] == [-100, -100, -100, tok.eos_token_id]


def test_pad_batch_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}]
    right = pad_batch(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    left = pad_batch(examples, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert all(t.dtype == torch.long for t in left.values())
    with pytest.raises(ValueError, match="middle"):
        pad_batch(examples, 0, side="middle")


def _records(prefix, n):
    return [QARecord(question=f"{prefix} question {i}?", answer=f"{prefix} answer {i}.") for i in range(n)]


def test_unlearn_dataset_pairing_is_deterministic(tok):
    forget, retain = _records("forget", 6), _records("retain", 4)
    a = UnlearnDataset(forget, retain, UNLEARN_TEMPLATES, tok, "plain", 64, seed=3)
    b = UnlearnDataset(forget, retain, UNLEARN_TEMPLATES, tok, "plain", 64, seed=3)
    c = UnlearnDataset(forget, retain, UNLEARN_TEMPLATES, tok, "plain", 64, seed=4)
    assert len(a) == 6
    pairs = [a.pairing(i) for i in range(len(a))]
    assert pairs == [b.pairing(i) for i in range(len(b))]
    assert pairs != [c.pairing(i) for i in range(len(c))]
    assert sorted(a.retain_index[:4]) == [0, 1, 2, 3]  # a permutation, cycled past len(retain)
    assert a.retain_index[4:] == a.retain_index[:2]
    for i, p in enumerate(pairs):
        assert p["forget"] == (forget[i].question, forget[i].answer)
        assert p["forget_idk"][0] == forget[i].question and p["forget_idk"][1] in UNLEARN_TEMPLATES
        assert p["retain"][0] == p["retain_idk"][0] and p["retain_idk"][1] in UNLEARN_TEMPLATES
    assert a[2]["forget"] == b[2]["forget"] and a[2]["retain_idk"] == b[2]["retain_idk"]
    with pytest.raises(ValueError):
        UnlearnDataset([], retain, UNLEARN_TEMPLATES, tok, "plain", 64)


def test_collate_unlearn_keys_and_shapes(tok):
    ds = UnlearnDataset(_records("forget", 5), _records("retain", 7), UNLEARN_TEMPLATES, tok,
                        "llama2", 48, seed=0)
    loader = DataLoader(ds, batch_size=2, shuffle=False,
                        collate_fn=partial(collate_unlearn, pad_id=tok.pad_token_id))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    batch = batches[0]
    assert set(batch) == set(PAIR_KEYS) | {"index"}
    for key in PAIR_KEYS:
        part = batch[key]
        assert set(part) == {"input_ids", "attention_mask", "labels"}
        assert part["input_ids"].shape == part["labels"].shape == part["attention_mask"].shape
        assert part["input_ids"].shape[0] == 2 and part["input_ids"].shape[1] <= 48
        assert ((part["labels"] != -100) <= (part["attention_mask"] == 1)).all()
        assert (part["labels"] == tok.eos_token_id).sum() == 2  # one EOS label per row
