"""The unlearning training set: forget examples paired with retain examples and IDK answers.

Item ``i`` is forget record ``i`` together with a retain record and two rejection templates (one
for the forget question, one for the retain question), all chosen once from the seed:

* ``forget``:     forget question + its true answer (GA, NPO, ME, DPO's rejected answer, ...);
* ``forget_idk``: forget question + a rejection template (IDK, DPO's chosen answer);
* ``retain``:     retain question + its answer (GD, KL regularizers);
* ``retain_idk``: retain question + a rejection template (AP regularizer's rejected answer);
* ``index``:      ``i`` (to look up reference log-probs computed once before training).

Retain records are visited in a seeded permutation (cycled when there are fewer retain than
forget records), so every epoch sees the same fixed pairs; the seed code pairs by index too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from raysweep.data.formatting import encode_qa, pad_batch
from raysweep.data.records import QARecord

PAIR_KEYS: tuple[str, ...] = ("forget", "forget_idk", "retain", "retain_idk")


class UnlearnDataset(Dataset):
    """Torch dataset over forget records with deterministic retain / IDK pairing."""

    def __init__(self, forget: Sequence[QARecord], retain: Sequence[QARecord],
                 idk_templates: Sequence[str], tokenizer: Any, template: str, max_length: int,
                 seed: int = 0):
        if not forget:
            raise ValueError("UnlearnDataset needs at least one forget record")
        if not retain:
            raise ValueError("UnlearnDataset needs at least one retain record")
        if not idk_templates:
            raise ValueError("UnlearnDataset needs at least one IDK template")
        self.forget = list(forget)
        self.retain = list(retain)
        self.idk_templates = list(idk_templates)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.seed = seed

        rng = random.Random(seed)
        order = list(range(len(self.retain)))
        rng.shuffle(order)
        n = len(self.forget)
        self.retain_index = [order[i % len(order)] for i in range(n)]
        self.forget_idk_index = [rng.randrange(len(self.idk_templates)) for _ in range(n)]
        self.retain_idk_index = [rng.randrange(len(self.idk_templates)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.forget)

    def pairing(self, i: int) -> dict[str, Any]:
        """The texts item ``i`` is built from (question/answer per key), for inspection and logs."""
        f, r = self.forget[i], self.retain[self.retain_index[i]]
        return {
            "forget": (f.question, f.answer),
            "forget_idk": (f.question, self.idk_templates[self.forget_idk_index[i]]),
            "retain": (r.question, r.answer),
            "retain_idk": (r.question, self.idk_templates[self.retain_idk_index[i]]),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{key: {"input_ids", "labels"} for key in PAIR_KEYS}`` plus ``"index": i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        item: dict[str, Any] = {
            key: encode_qa(self.tokenizer, question, answer, self.template, self.max_length)
            for key, (question, answer) in self.pairing(i).items()
        }
        item["index"] = i
        return item


def collate_unlearn(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch ``UnlearnDataset`` items: each of ``PAIR_KEYS`` right-padded with ``pad_batch``
    (``input_ids``, ``attention_mask``, ``labels``) and ``"index"`` as a LongTensor.
    Use with ``functools.partial(collate_unlearn, pad_id=tokenizer.pad_token_id)``."""
    batch: dict[str, Any] = {key: pad_batch([item[key] for item in items], pad_id, side="right")
                             for key in PAIR_KEYS}
    batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch
