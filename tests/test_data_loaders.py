"""Loaders: local JSONL round trip, task filter, every bad-file error, hub mapping, real data."""

import json
from pathlib import Path

import pytest

from raysweep.data.loaders import DataError, load_hub_split, load_local_split, write_local_splits
from raysweep.data.records import QARecord
from raysweep.data.synthetic import SyntheticSpec, generate

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines),
                    encoding="utf-8")
    return path


def test_round_trip_equals_synthetic(tmp_path):
    corpus = generate(SyntheticSpec(n_authors=10, n_questions=3, n_holdout_authors=1,
                                    n_real_authors=4, n_world_facts=5, n_prior_entities=2))
    paths = write_local_splits(corpus.splits, tmp_path / "data")
    assert {p.stem for p in paths} == set(corpus.splits)
    for name, records in corpus.splits.items():
        loaded = load_local_split(tmp_path / "data", name)
        assert loaded == records, name
        assert all(type(r) is QARecord for r in loaded)
    task1 = load_local_split(tmp_path / "data", "forget10", task_ids=[1])
    assert task1 == [r for r in corpus.splits["forget10"] if r.task_id == 1]


def test_task_id_strings_and_filter(tmp_path):
    _write(tmp_path / "f.json", [{"task_id": "1", "question": "q1", "answer": "a1"},
                                 {"task_id": "2", "question": "q2", "answer": "a2"},
                                 {"task_id": 3, "question": "q3", "answer": "a3"}])
    assert [r.question for r in load_local_split(tmp_path, "f", task_ids=[1, 3])] == ["q1", "q3"]
    assert load_local_split(tmp_path, "f")[1].task_id == 2
    with pytest.raises(DataError, match="task_id"):
        load_local_split(tmp_path, "f", task_ids=[7])


@pytest.mark.parametrize("lines, key, line_no, text", [
    (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": '], None, 2, "not valid JSON"),
    ([{"answer": "a"}], "question", 1, "missing"),
    ([{"question": "q", "answer": "a"}, {"question": "q"}], "answer", 2, "missing"),
    ([{"question": "q", "answer": 3}], "answer", 1, "string"),
    ([{"question": "q", "answer": "a", "perturbed_answer": "wrong"}], "perturbed_answer", 1, "list"),
    ([{"question": "q", "answer": "a", "perturbed_answer": ["x", 1]}], "perturbed_answer", 1, "list"),
    ([{"question": "q", "answer": "a", "task_id": "one"}], "task_id", 1, "integer"),
    (['["not", "an", "object"]'], None, 1, "JSON object"),
])
def test_bad_files_raise_one_line_errors(tmp_path, lines, key, line_no, text):
    path = _write(tmp_path / "bad.json", lines)
    with pytest.raises(DataError) as info:
        load_local_split(tmp_path, "bad")
    err = info.value
    assert err.path == str(path) and err.key == key and err.line == line_no
    message = str(err)
    assert "\n" not in message and f"bad.json:{line_no}" in message and text in message
    if key:
        assert f"'{key}'" in message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nothere.json"):
        load_local_split(tmp_path, "nothere")
    (tmp_path / "empty.json").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.json: file holds no record"):
        load_local_split(tmp_path, "empty")


def test_hub_split_maps_rows(monkeypatch):
    import datasets

    rows = [{"question": "Who?", "answer": "Her.", "paraphrased_answer": "It is her.",
             "perturbed_answer": ["Him.", "Them."], "paraphrased_question": "Who is it?"},
            {"question": "Where?", "answer": "Here.", "paraphrased_answer": "Right here.",
             "perturbed_answer": ["There."], "paraphrased_question": "Where is it?"}]
    calls = []

    def fake_load_dataset(repo, name, split):
        calls.append((repo, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_hub_split("forget10_perturbed")
    assert calls == [("locuslab/TOFU", "forget10_perturbed", "train")]
    assert records == [QARecord.from_dict(r) for r in rows]
    assert records[0].perturbed_answer == ("Him.", "Them.")

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, name, split: datasets.Dataset.from_list([{"question": "q", "answer": None}]))
    with pytest.raises(DataError, match="locuslab/TOFU:retain90:1"):
        load_hub_split("retain90")


@pytest.mark.parametrize("sub, split, n, field", [
    ("tofu", "forget10_perturbed", 3600, "paraphrased_answer"),
    ("tofu", "retain90", 3600, None),
    ("tofu", "world_facts_perturbed", 117, "original_answer"),
    ("real_world", "forget", 400, "golden_answer"),
    ("real_world", "neighbor_perturbed", 400, "paraphrased_question"),
])
def test_load_shared_data(sub, split, n, field):
    data_dir = SHARED / "data" / sub
    if not data_dir.is_dir():
        pytest.skip("shared data not present")
    records = load_local_split(data_dir, split)
    assert len(records) == n
    assert all(type(r) is QARecord and r.question and isinstance(r.answer, str) for r in records)
    if field:
        assert all(getattr(r, field) for r in records)
    if split == "forget10_perturbed":
        assert {r.task_id for r in records} == set(range(1, 10))
        assert all(len(r.perturbed_answer) == 5 for r in records)
        assert len(load_local_split(data_dir, split, task_ids=[1])) == 400
