"""Rejection ("I don't know") answers.

The IDK, DPO and AP unlearning methods train the model to answer forget questions with a
rejection instead of the fact.  Two disjoint sets are kept:

* ``UNLEARN_TEMPLATES``: the targets used by those methods during unlearning;
* ``PRIOR_TEMPLATES``: the rejections the embedded tiny target model sees during its
  pre-training (questions about entities it knows nothing about), so that it has a "rejection
  prior" like a real chat model, without ever having seen the exact unlearning targets.

``load_idk_templates`` reads TOFU's ``idontknow.jsonl`` (one plain-text line per template) when a
path is given, else returns the project's own ``UNLEARN_TEMPLATES``.
"""

from __future__ import annotations

import json
from pathlib import Path

from raysweep.data.loaders import DataError

# The project's own rejection answers (64, all distinct).  The split below is by position:
# even positions -> UNLEARN_TEMPLATES, odd positions -> PRIOR_TEMPLATES.
REJECTION_TEMPLATES: tuple[str, ...] = (
    "I don't know the answer to that.",
    "I have no idea.",
    "Sorry, I do not know.",
    "I really could not tell you.",
    "That is not something I know.",
    "I am not able to answer that.",
    "I have never heard of that.",
    "I can't recall anything about that.",
    "I don't have any facts about that.",
    "No idea, sorry.",
    "I am afraid I don't know.",
    "I cannot say.",
    "I know nothing about that.",
    "That is unknown to me.",
    "I'm not sure, sorry.",
    "I can't answer that one.",
    "I have no information about that.",
    "I do not have an answer.",
    "I'm unable to say.",
    "Nothing comes to mind, sorry.",
    "I can't help with that question.",
    "I don't remember anything like that.",
    "That question is beyond what I know.",
    "I'm afraid that is unknown to me.",
    "I would only be guessing, so I won't answer.",
    "I can't give you an answer to that.",
    "Honestly, I don't know.",
    "I have no record of that.",
    "I'm sorry, I can't tell you that.",
    "I have not learned about that.",
    "That is a question I can't answer.",
    "I'm not aware of that.",
    "I don't have the details on that.",
    "I can't say for sure.",
    "Sorry, that is outside what I know.",
    "I don't know anything about it.",
    "I have no answer for that.",
    "I wish I knew, but I don't.",
    "I'm not familiar with that.",
    "I'm sorry, I have no idea.",
    "I can't provide that information.",
    "That doesn't ring a bell.",
    "I don't know, sorry.",
    "I'm not certain at all.",
    "I lack the knowledge to answer that.",
    "That is not something I can answer.",
    "I have nothing to say about that.",
    "I couldn't tell you, sorry.",
    "I'm afraid I can't answer that.",
    "I never learned that.",
    "I can't answer, as I don't know.",
    "I'm in no position to answer that.",
    "I really have no idea about that.",
    "That is a mystery to me.",
    "I don't have that answer.",
    "Sadly, I don't know that.",
    "I have not heard about that.",
    "I'm not able to tell you.",
    "I'd rather not guess, since I don't know.",
    "That is beyond me, sorry.",
    "I'm drawing a blank here.",
    "I don't know who or what that is.",
    "I'm clueless on that one.",
    "I can't find an answer to that.",
)

UNLEARN_TEMPLATES: tuple[str, ...] = REJECTION_TEMPLATES[0::2]
PRIOR_TEMPLATES: tuple[str, ...] = REJECTION_TEMPLATES[1::2]


def load_idk_templates(path: str | Path | None) -> list[str]:
    """Rejection templates for unlearning: ``UNLEARN_TEMPLATES`` when ``path`` is None, else the
    non-empty lines of ``path`` (TOFU ``idontknow.jsonl``: one plain-text template per line; a line
    that is a JSON string literal is decoded).  Raises ``DataError`` naming the file when it is
    missing or holds no template."""
    if path is None:
        return list(UNLEARN_TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "IDK template file not found")
    templates = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith('"'):
            try:
                decoded = json.loads(line)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, str):
                line = decoded.strip()
        if line:
            templates.append(line)
    if not templates:
        raise DataError(path, None, "IDK template file holds no template (all lines empty)")
    return templates


def load_seed_idk_lines(path: str | Path) -> list[str]:
    """The rejection templates exactly as the seed code reads them: every line of the file
    (``f.readlines()``), each ``.strip()``-ed when used (``dataset/data_module.py:96-98, 126``),
    so template ``k`` is line ``k``.  Raises ``DataError`` naming the file when it is missing or
    empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "IDK template file not found")
    with path.open(encoding="utf-8") as f:
        lines = [line.strip() for line in f.readlines()]
    if not lines:
        raise DataError(path, None, "IDK template file holds no template")
    return lines
