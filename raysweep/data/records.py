"""The one record type every loader returns: a question/answer pair in TOFU's schema."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QARecord:
    """One question/answer pair.

    Fictitious (TOFU) sets use ``question``/``answer`` and, in the ``*_perturbed`` evaluation
    sets, ``paraphrased_answer``, ``paraphrased_question`` and ``perturbed_answer``.  General
    knowledge sets (real authors, world facts) have a short ``answer``, 3 perturbed options and a
    full-sentence ``original_answer``.  Real-world sets add ``name`` (the person) and
    ``golden_answer`` (the fact used for scoring; ``answer`` is the model's own reply).
    """

    question: str
    answer: str
    paraphrased_answer: str | None = None
    paraphrased_question: str | None = None
    perturbed_answer: tuple[str, ...] = field(default_factory=tuple)
    task_id: int | None = None
    original_answer: str | None = None
    name: str | None = None
    golden_answer: str | None = None

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "QARecord":
        """Build a record from one JSON object; unknown keys are ignored, missing required keys raise KeyError."""
        task_id = row.get("task_id")
        return cls(
            question=row["question"],
            answer=row["answer"],
            paraphrased_answer=row.get("paraphrased_answer"),
            paraphrased_question=row.get("paraphrased_question"),
            perturbed_answer=tuple(row.get("perturbed_answer") or ()),
            task_id=int(task_id) if task_id is not None else None,
            original_answer=row.get("original_answer"),
            name=row.get("name"),
            golden_answer=row.get("golden_answer"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the seed layout: ``None`` fields and empty perturbed lists are left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "perturbed_answer" and not value):
                continue
            out[f.name] = list(value) if f.name == "perturbed_answer" else value
        return out
