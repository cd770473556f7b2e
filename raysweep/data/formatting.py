"""Prompt formats, question/answer tokenization with label masking, and padding.

A training example is ``prompt + answer + EOS``; the loss is computed on the answer tokens and the
EOS only (prompt labels are -100).  Generation feeds the same prompt ids (``encode_prompt``), so
what the model is trained to continue is exactly what it is asked to continue at evaluation.

Formats (``PROMPT_TEMPLATES``):

* ``plain``: ``"Question: {q}\\nAnswer:"`` then ``" {a}"`` (the embedded tiny models);
* ``llama2``: Llama-2-chat ``"[INST] {q} [/INST]"`` then ``"{a}"`` (no space: TOFU's format);
* ``llama3``: Llama-3-instruct headers, user turn then an open assistant turn, then ``"{a}"``;
* ``chat_template``: the tokenizer's own ``apply_chat_template(..., add_generation_prompt=True)``
  then ``"{a}"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PROMPT_TEMPLATES: tuple[str, ...] = ("plain", "llama2", "llama3", "chat_template")

IGNORE_INDEX = -100  # label value ignored by the loss (torch cross_entropy's default)

_LLAMA3_PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _check_template(template: str) -> None:
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {PROMPT_TEMPLATES}")


def format_prompt(question: str, template: str, tokenizer: Any = None) -> str:
    """The prompt text for ``question``, up to where the answer starts.

    ``tokenizer`` is needed only for ``chat_template`` (its ``apply_chat_template``)."""
    _check_template(template)
    if template == "plain":
        return f"Question: {question}\nAnswer:"
    if template == "llama2":
        return f"[INST] {question} [/INST]"
    if template == "llama3":
        return _LLAMA3_PROMPT.format(q=question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt template 'chat_template' needs a tokenizer that has a chat_template")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def format_answer(answer: str, template: str) -> str:
    """The answer text as it follows the prompt: a leading space after ``Answer:``; nothing after
    ``[/INST]`` (TOFU and the seed code train on ``[INST] q [/INST]answer``: ``answer_tag: ""``
    in the seed's ``config/model_config.yaml:4-6``, which is how the TOFU Llama-2 models were
    fine-tuned) nor after a chat header (which already ends in a newline; ``llama3`` matches
    the seed's tags, ``model_config.yaml:11-13``)."""
    _check_template(template)
    return f" {answer}" if template == "plain" else answer


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; a trailing EOS appended by the tokenizer's post-processor is dropped
    (the caller decides where the single EOS goes)."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if add_special_tokens and ids and eos is not None and ids[-1] == eos and not (
            eos_text and text.endswith(eos_text)):
        ids.pop()
    return ids


def uses_special_tokens(tokenizer: Any, prompt: str) -> bool:
    """Add the tokenizer's special tokens (BOS) unless the prompt text already starts with BOS
    (chat templates usually write it themselves)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def encode_prompt(tokenizer: Any, question: str, template: str) -> list[int]:
    """Prompt token ids (with BOS where the tokenizer adds one), as used for generation."""
    prompt = format_prompt(question, template, tokenizer)
    return _tokenize(tokenizer, prompt, uses_special_tokens(tokenizer, prompt))


def encode_qa(tokenizer: Any, question: str, answer: str, template: str,
              max_length: int) -> dict[str, list[int]]:
    """Tokenize one question/answer pair for training or likelihood evaluation.

    Returns ``{"input_ids", "labels"}``: prompt ids (labels -100), answer ids (labels = ids), one
    EOS (label = EOS id).  The answer ids are those the answer gets right after the prompt: the
    tokenization of ``prompt + answer`` past the prompt's ids when that starts with them (so
    SentencePiece tokenizers do not get a spurious word-boundary token), else the answer tokenized
    on its own without special tokens.  Longer than ``max_length`` -> cut at the end, keeping the
    final EOS (a prompt longer than ``max_length`` leaves only the EOS label).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    prompt = format_prompt(question, template, tokenizer)
    answer_text = format_answer(answer, template)
    special = uses_special_tokens(tokenizer, prompt)

    prompt_ids = _tokenize(tokenizer, prompt, special)
    full_ids = _tokenize(tokenizer, prompt + answer_text, special)
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        answer_ids = full_ids[len(prompt_ids):]
    else:
        answer_ids = _tokenize(tokenizer, answer_text, add_special_tokens=False)

    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if len(input_ids) + 1 > max_length:
        input_ids, labels = input_ids[:max_length - 1], labels[:max_length - 1]
    return {"input_ids": input_ids + [eos], "labels": labels + [eos]}


def pad_batch(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int,
              side: str = "right", length: int | None = None,
              attend_last: bool = True) -> dict[str, torch.Tensor]:
    """Pad a list of ``{"input_ids"[, "labels"]}`` to one ``(batch, max_len)`` LongTensor each.

    ``side="right"`` for training/likelihood, ``"left"`` for batched generation (prompts end where
    generation starts).  ``attention_mask`` is 1 on real tokens; labels are padded with -100 (an
    example without labels gets all -100).  ``length``: pad to this width instead of the longest
    example's.  ``attend_last=False`` (right padding only) sets the attention of each example's
    last token (the EOS ``encode_qa`` appends) to 0: the seed code's layout, where that EOS is the
    first padding token (``dataset/data_module.py:40-48``)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if not attend_last and side != "right":
        raise ValueError("attend_last=False needs right padding")
    width = max(len(ex["input_ids"]) for ex in examples)
    if length is not None:
        if length < width:
            raise ValueError(f"pad_batch: an example has {width} tokens, more than length={length}")
        width = length
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = list(ex["input_ids"])
        labs = list(ex.get("labels", [IGNORE_INDEX] * len(ids)))
        if len(labs) != len(ids):
            raise ValueError(f"example {row}: {len(ids)} input_ids but {len(labs)} labels")
        n = len(ids)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        if not attend_last:
            attention_mask[row, n - 1] = 0
        labels[row, cols] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
