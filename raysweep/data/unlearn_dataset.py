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


PAIRINGS: tuple[str, ...] = ("raysweep", "seed")


def seed_pairing(i: int, n_retain: int, n_templates: int) -> tuple[int, int]:
    """The seed code's pairing of forget item ``i`` (``dataset/data_module.py:108-110``): with the
    torch RNG seeded by ``i``, ``retain = (i + randint(0, n_retain)) % n_retain`` then one template
    ``randint(0, n_templates)``, shared by the forget-IDK and the retain-IDK sample (``:125-126``).
    Uses its own generator (same stream as ``torch.manual_seed(i)``), not the global one."""
    g = torch.Generator().manual_seed(i)
    retain = (i + int(torch.randint(0, n_retain, (1,), generator=g).item())) % n_retain
    template = int(torch.randint(0, n_templates, (1,), generator=g).item())
    return retain, template


class UnlearnDataset(Dataset):
    """Torch dataset over forget records with deterministic retain / IDK pairing."""

    def __init__(self, forget: Sequence[QARecord], retain: Sequence[QARecord],
                 idk_templates: Sequence[str], tokenizer: Any, template: str, max_length: int,
                 seed: int = 0, pairing: str = "raysweep"):
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

        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.pairing_mode = pairing
        n = len(self.forget)
        if pairing == "seed":
            pairs = [seed_pairing(i, len(self.retain), len(self.idk_templates)) for i in range(n)]
            self.retain_index = [r for r, _ in pairs]
            self.forget_idk_index = self.retain_idk_index = [t for _, t in pairs]
            return
        rng = random.Random(seed)
        order = list(range(len(self.retain)))
        rng.shuffle(order)
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


def collate_unlearn(items: Sequence[dict[str, Any]], pad_id: int, length: int | None = None,
                    seed_layout: bool = False) -> dict[str, Any]:
    """Batch ``UnlearnDataset`` items: each of ``PAIR_KEYS`` right-padded with ``pad_batch``
    (``input_ids``, ``attention_mask``, ``labels``) and ``"index"`` as a LongTensor.
    Use with ``functools.partial(collate_unlearn, pad_id=tokenizer.pad_token_id)``.

    ``seed_layout=True`` (protocol seed): every part padded to ``length`` (the seed pads each
    sample to ``max_length``) with the final EOS unattended, as the seed code lays samples out
    (``dataset/data_module.py:40-48``); pass the EOS id as ``pad_id`` (the seed sets
    ``pad_token = eos_token``, ``forget.py:109``)."""
    if seed_layout and length is None:
        raise ValueError("collate_unlearn(seed_layout=True) needs length (data.max_length)")
    batch: dict[str, Any] = {
        key: pad_batch([item[key] for item in items], pad_id, side="right",
                       length=length if seed_layout else None, attend_last=not seed_layout)
        for key in PAIR_KEYS
    }
    batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch
