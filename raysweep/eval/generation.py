"""Batched greedy generation for the evaluation (ROUGE, TE, CS, ES need the model's answers).

Prompts are tokenized once, sorted by length (so a batch holds prompts of similar length and
little padding), LEFT-padded (decoder-only models continue from the last position), generated
greedily, and returned in the caller's order with the prompt stripped.

Length budget: like TOFU's ``generate(max_length=200)``, prompt + generation is at most
``max_length`` tokens — but per example, counting the example's own prompt tokens and not the
padding of its batch, so a batched result equals the unbatched one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from raysweep.data.formatting import pad_batch

__all__ = ["generate_batched", "model_device", "eos_token_ids"]


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s parameters (``model.device`` for HF models)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS plus the model's
    ``generation_config.eos_token_id`` (an int or a list, e.g. Llama-3's ``<|eot_id|>``)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    gc_eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if gc_eos is not None:
        for i in [gc_eos] if isinstance(gc_eos, int) else list(gc_eos):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _answer_tokens(row: list[int], budget: int, eos_ids: list[int]) -> list[int]:
    """The generated ids of one example: within its budget, up to its first EOS."""
    row = row[:budget]
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[:j]
    return row


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int,
    max_length: int = 200,
    synced_gpus: bool = False,
    add_special_tokens: bool = True,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (in order), decoded with ``skip_special_tokens=True``.

    ``prompts``: texts (tokenized here, ``add_special_tokens``) or token ids already encoded
    (``raysweep.data.formatting.encode_prompt``).

    * left padding; the pad id is the tokenizer's pad token, or EOS when it has none (the
      tokenizer itself is not modified: padding is done here, and its ``padding_side`` is
      restored even on error);
    * each example gets at most ``max_length - len(prompt tokens)`` new tokens (empty string
      when its prompt is already ``>= max_length``), or ``max_new_tokens`` each when given;
      generation stops at any EOS id;
    * ``synced_gpus=True`` (DeepSpeed ZeRO-3 across ranks): every rank must call this with the
      same number of batches (same ``len(prompts)`` and ``batch_size``) — a batch is never
      skipped on that path.
    """
    prompts = list(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        if not eos_ids:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        pad_id = eos_ids[0]

    old_side = tokenizer.padding_side
    was_training = model.training
    try:
        tokenizer.padding_side = "left"
        if isinstance(prompts[0], str):
            encoded = tokenizer(prompts, add_special_tokens=add_special_tokens, padding=False)["input_ids"]
        else:
            encoded = [list(p) for p in prompts]
        model.eval()
        device = model_device(model)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [list(encoded[i]) for i in idx]
            budgets = [max_new_tokens if max_new_tokens is not None else max(0, max_length - len(s)) for s in seqs]
            max_new = max(budgets)
            if max_new == 0:
                if not synced_gpus:
                    continue  # every prompt already fills max_length: empty answers
                max_new = 1  # keep the collective generate() calls aligned across ranks
            batch = pad_batch([{"input_ids": s} for s in seqs], pad_id, side="left")
            width = batch["input_ids"].shape[1]
            gen = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_ids or None,
                synced_gpus=synced_gpus,
                use_cache=True,
            )
            texts = [_answer_tokens(row, budget, eos_ids) for row, budget in zip(gen[:, width:].tolist(), budgets)]
            decoded = tokenizer.batch_decode(texts, skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = text
        return out
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
