"""Loading question/answer splits into ``QARecord`` lists.

Three sources, one record type:

* ``load_local_split(data_dir, split)``: the seed code's layout, ``<data_dir>/<split>.json`` in
  JSON Lines (e.g. ``data/tofu/forget10_perturbed.json``, ``data/real_world/forget.json``);
* ``load_hub_split(config_name)``: the TOFU dataset on the Hugging Face hub (needs internet);
* ``write_local_splits(splits, data_dir)``: the inverse of ``load_local_split`` (used to
  materialise the synthetic corpus in the seed layout).

Every malformed input raises ``DataError`` with a one-line message naming the file, the line and
the offending key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from raysweep.data.records import QARecord

# Optional string fields a row may carry (besides the required question/answer).
_OPTIONAL_STR_KEYS = ("paraphrased_answer", "paraphrased_question", "original_answer", "name",
                      "golden_answer")


class DataError(ValueError):
    """A data file (or hub split) that cannot be turned into records.

    ``path``: the file (or ``repo:config`` for hub data); ``key``: the offending key or None;
    ``line``: 1-based line number when the problem is in one line.
    """

    def __init__(self, path: str | Path, key: str | None, message: str, line: int | None = None):
        self.path = str(path)
        self.key = key
        self.message = message
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        what = message if key is None else f"{message} (key '{key}')"
        super().__init__(f"{where}: {what}")


def record_from_row(row: Any, path: str | Path, line: int | None = None) -> QARecord:
    """Validate one JSON object and turn it into a ``QARecord``; raise ``DataError`` otherwise."""
    if not isinstance(row, dict):
        raise DataError(path, None, f"expected a JSON object, got {type(row).__name__}", line)
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(path, key, "missing required key", line)
        if not isinstance(row[key], str):
            raise DataError(path, key, f"expected a string, got {type(row[key]).__name__}", line)
    for key in _OPTIONAL_STR_KEYS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(path, key, f"expected a string, got {type(value).__name__}", line)
    perturbed = row.get("perturbed_answer")
    if perturbed is not None:
        if not isinstance(perturbed, list) or not all(isinstance(p, str) for p in perturbed):
            raise DataError(path, "perturbed_answer", "expected a list of strings", line)
    task_id = row.get("task_id")
    if task_id is not None:
        try:
            int(task_id)
        except (TypeError, ValueError):
            raise DataError(path, "task_id", f"expected an integer, got {task_id!r}", line) from None
    return QARecord.from_dict(row)


def _filter_tasks(records: list[QARecord], task_ids: Iterable[int] | None,
                  path: str | Path) -> list[QARecord]:
    """Keep the records whose ``task_id`` is in ``task_ids`` (all when None)."""
    if task_ids is None:
        return records
    wanted = {int(t) for t in task_ids}
    kept = [r for r in records if r.task_id in wanted]
    if not kept:
        present = sorted({r.task_id for r in records if r.task_id is not None})
        raise DataError(path, "task_id", f"no record with task_id in {sorted(wanted)} "
                                         f"(present: {present})")
    return kept


def load_local_split(data_dir: str | Path, split: str,
                     task_ids: Iterable[int] | None = None) -> list[QARecord]:
    """Read ``<data_dir>/<split>.json`` (JSON Lines, one record per non-empty line).

    ``task_ids`` keeps only the continual-learning subtasks listed (e.g. ``[1]`` for the usual
    forget split).  Raises ``DataError`` on a missing/empty file, a line that is not JSON, a
    record without ``question``/``answer`` or a field of the wrong type.
    """
    path = Path(data_dir) / f"{split}.json"
    if not path.is_file():
        raise DataError(path, None, f"split '{split}' not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, None, f"not valid JSON ({e.msg})", lineno) from None
            records.append(record_from_row(row, path, lineno))
    if not records:
        raise DataError(path, None, "file holds no record")
    return _filter_tasks(records, task_ids, path)


def load_hub_split(config_name: str, repo: str = "locuslab/TOFU",
                   task_ids: Iterable[int] | None = None) -> list[QARecord]:
    """Load ``repo``/``config_name`` (train split) from the Hugging Face hub as records.

    TOFU's configs: ``forget01``, ``forget05``, ``forget10`` (+ ``_perturbed``), ``retain90``,
    ``retain95``, ``retain99``, ``retain_perturbed``, ``real_authors_perturbed``,
    ``world_facts_perturbed``, ``full``.
    """
    import datasets  # heavy import, only needed here

    dataset = datasets.load_dataset(repo, config_name, split="train")
    label = f"{repo}:{config_name}"
    records = [record_from_row(dict(row), label, i + 1) for i, row in enumerate(dataset)]
    if not records:
        raise DataError(label, None, "hub split holds no record")
    return _filter_tasks(records, task_ids, label)


def write_local_splits(splits: Mapping[str, Sequence[QARecord]], data_dir: str | Path) -> list[Path]:
    """Write each split to ``<data_dir>/<name>.json`` as JSON Lines (``QARecord.to_dict`` rows),
    creating ``data_dir``; returns the written paths.  ``load_local_split`` reads them back into
    equal records."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in splits.items():
        path = data_dir / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


def load_qa_file(path: str | Path) -> list[QARecord]:
    """General QA from a local file, for the continual retain supplement: a JSON array or JSON
    Lines, each record ``{question, answer}`` or Alpaca's ``{instruction, input, output}``
    (question = instruction, then the input on a new line when non-empty; answer = output).
    Raises ``DataError`` naming the file (and line) on anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, None, "file not found")
    text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
        rows = [(None, r) for r in parsed] if isinstance(parsed, list) else [(1, parsed)]
    except json.JSONDecodeError:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, None, f"not valid JSON ({e.msg})", lineno) from None
    records = []
    for lineno, row in rows:
        if isinstance(row, dict) and "question" not in row and "instruction" in row:
            if not isinstance(row.get("output"), str) or not isinstance(row["instruction"], str):
                raise DataError(path, "output", "an Alpaca record needs string instruction and output", lineno)
            extra = row.get("input") or ""
            question = row["instruction"] + (f"\n{extra}" if extra.strip() else "")
            row = {"question": question, "answer": row["output"]}
        records.append(record_from_row(row, path, lineno))
    if not records:
        raise DataError(path, None, "file holds no record")
    return records
