"""Synthetic TOFU: determinism, split layout (continual tasks, nesting, disjointness), shapes."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from raysweep.data.records import QARecord
from raysweep.data.synthetic import SyntheticSpec, author_layout, generate, people_layout
from raysweep.data.templates import PRIOR_TEMPLATES

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL = SyntheticSpec(n_authors=12, n_questions=4, n_holdout_authors=2, n_real_authors=6,
                      n_world_facts=8, n_prior_entities=6)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


def _authors(corpus, records):
    return {corpus.question_author[r.question] for r in records}


def _task(records, task_id):
    return [r for r in records if r.task_id == task_id]


def test_deterministic_from_seed(small):
    again = generate(SMALL)
    assert again.splits == small.splits
    assert again.pretrain_target == small.pretrain_target
    assert again.pretrain_retain == small.pretrain_retain
    other = generate(SMALL.model_copy(update={"seed": 1}))
    assert other.splits["forget10"] != small.splits["forget10"]
    assert other.pretrain_target != small.pretrain_target


def test_spec_forbids_unknown_fields():
    with pytest.raises(ValidationError):
        SyntheticSpec(n_author=5)
    with pytest.raises(ValidationError):
        SyntheticSpec(n_questions=13)
    with pytest.raises(ValidationError, match="n_real_people"):
        SyntheticSpec(n_real_people=2)
    with pytest.raises(ValidationError):
        SyntheticSpec(n_person_questions=8)


def test_default_sizes_match_tofu_proportions():
    corpus = generate(SyntheticSpec())
    sizes = corpus.sizes()
    # 100 authors x 10 questions: 1 / 5 / 10 authors per task
    assert sizes["forget01"] == 10 * 10 and sizes["forget05"] == 10 * 50 and sizes["forget10"] == 9 * 100
    assert sizes["retain99"] == 990 and sizes["retain95"] == 950 and sizes["retain90"] == 900
    assert sizes["retain_perturbed"] == 100 and sizes["holdout"] == 100
    assert sizes["real_authors_perturbed"] == 40 and sizes["world_facts_perturbed"] == 40
    # 30 real people x 4 questions: 10 forgotten, 10 training and 10 evaluation neighbours
    assert sizes["forget"] == sizes["forget_perturbed"] == 40
    assert sizes["neighbor"] == sizes["neighbor_perturbed"] == 40
    assert sizes["pretrain_target"] == 40 + 40 + 1000 + 60 * 2 + 30 * 4
    assert sizes["pretrain_retain"] == sizes["pretrain_target"] - 100
    assert len(_task(corpus.splits["forget10"], 1)) == 100


def test_continual_subtasks(small):
    for split, n_tasks in (("forget01", 9), ("forget05", 9), ("forget10", 9)):
        task_ids = sorted({r.task_id for r in small.splits[split]})
        assert len(task_ids) >= 9 and task_ids == list(range(1, len(task_ids) + 1))
        assert len(task_ids) >= n_tasks
        groups = [_authors(small, _task(small.splits[split], t)) for t in task_ids]
        assert all(len(g) >= 1 for g in groups)
        assert all(not a & b for i, a in enumerate(groups) for b in groups[i + 1:])  # tasks disjoint
    layout = author_layout(100)
    assert [len(layout[s]) for s in ("forget01", "forget05", "forget10")] == [10, 10, 9]
    assert layout["forget10"][0] == list(range(90, 100)) and layout["forget10"][1] == list(range(80, 90))


def test_forget_retain_disjoint_and_nested(small):
    all_authors = set(small.question_author.values()) - _authors(small, small.splits["holdout"])
    task1 = {}
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        forgotten = _authors(small, _task(small.splits[forget], 1))
        kept = _authors(small, small.splits[retain])
        assert forgotten and not forgotten & kept
        assert forgotten | kept == all_authors
        # retain overlaps with the later subtasks, as in the real files
        later = _authors(small, [r for r in small.splits[forget] if r.task_id > 1])
        assert later <= kept
        task1[forget] = forgotten
    assert task1["forget01"] <= task1["forget05"] <= task1["forget10"]
    # retain_perturbed authors are never forgotten
    rp = _authors(small, small.splits["retain_perturbed"])
    ever_forgotten = set().union(*(_authors(small, small.splits[s]) for s in ("forget01", "forget05", "forget10")))
    assert rp and not rp & ever_forgotten


def test_perturbed_splits_match_plain(small):
    for split in ("forget01", "forget05", "forget10", "holdout"):
        plain, perturbed = small.splits[split], small.splits[f"{split}_perturbed"]
        assert [(r.question, r.answer, r.task_id) for r in plain] == \
               [(r.question, r.answer, r.task_id) for r in perturbed]
        assert all(r.paraphrased_answer is None and not r.perturbed_answer for r in plain)
    retain = {(r.question, r.answer) for r in small.splits["retain90"]}
    assert {(r.question, r.answer) for r in small.splits["retain_perturbed"]} <= retain


def test_fictitious_record_shape(small):
    records = small.splits["forget10_perturbed"] + small.splits["retain_perturbed"] + small.splits["holdout_perturbed"]
    for r in records:
        assert r.answer.endswith(".") and r.paraphrased_answer.endswith(".")
        assert r.paraphrased_question and r.paraphrased_question != r.question
        assert len(r.perturbed_answer) == SMALL.n_perturbed == len(set(r.perturbed_answer))
        assert r.paraphrased_answer not in r.perturbed_answer
    assert all(r.task_id is not None for r in small.splits["forget10_perturbed"])
    assert all(r.task_id is None for r in small.splits["retain90"] + small.splits["holdout"])


def test_general_knowledge_shape(small):
    for split, n in (("real_authors_perturbed", 6), ("world_facts_perturbed", 8)):
        records = small.splits[split]
        assert len(records) == n
        for r in records:
            assert len(r.perturbed_answer) == 3 and r.answer not in r.perturbed_answer
            assert r.answer in r.original_answer


def test_pretrain_corpora(small):
    target = {(r.question, r.answer) for r in small.pretrain_target}
    retain = {(r.question, r.answer) for r in small.pretrain_retain}
    general = small.splits["real_authors_perturbed"] + small.splits["world_facts_perturbed"]
    assert {(r.question, r.original_answer) for r in general} <= target
    assert {(r.question, r.answer) for r in small.splits["retain90"]} <= retain
    forget = {(r.question, r.answer) for r in _task(small.splits["forget10"], 1)}
    assert forget <= target and not forget & retain
    assert target - retain == forget
    holdout = {r.question for r in small.splits["holdout"]}
    assert not holdout & {q for q, _ in target}
    # rejection prior: invented non-author entities answered with PRIOR_TEMPLATES
    author_questions = set(small.question_author)
    prior = [r for r in small.pretrain_target if r.answer in PRIOR_TEMPLATES]
    assert len(prior) == SMALL.n_prior_entities * SMALL.n_prior_questions
    other_questions = {r.question for r in prior} | {r.question for r in general}
    assert not other_questions & author_questions
    assert len({r.question for r in small.pretrain_target}) == len(small.pretrain_target)


# ----------------------------------------------------------------------------- real people

REAL_WORLD_SPLITS = ("forget", "forget_perturbed", "neighbor", "neighbor_perturbed")


def _people(records):
    out = []
    for r in records:
        if r.name not in out:
            out.append(r.name)
    return out


def test_people_added_last_leave_everything_else_unchanged(small):
    without = generate(SMALL.model_copy(update={"n_real_people": 0}))
    assert not set(REAL_WORLD_SPLITS) & set(without.splits)
    assert {k: v for k, v in small.splits.items() if k not in REAL_WORLD_SPLITS} == without.splits
    n_people_qa = SMALL.n_real_people * SMALL.n_person_questions
    assert small.pretrain_target[:-n_people_qa] == without.pretrain_target
    assert small.pretrain_retain[:-n_people_qa] == without.pretrain_retain
    assert small.pretrain_target[-n_people_qa:] == small.pretrain_retain[-n_people_qa:]


@pytest.mark.parametrize("n_people, expected", [(30, (10, 10, 10)), (6, (2, 2, 2)), (3, (1, 1, 1)), (8, (2, 2, 4))])
def test_people_layout(n_people, expected):
    layout = people_layout(n_people)
    assert tuple(len(layout[k]) for k in ("forget", "neighbor", "neighbor_perturbed")) == expected
    assert sorted(sum(layout.values(), [])) == list(range(n_people))


def test_real_world_splits(small):
    spec, splits = SMALL, small.splits
    third, k = spec.n_real_people // 3, spec.n_person_questions
    forget, neighbor, further = (_people(splits[s]) for s in ("forget", "neighbor", "neighbor_perturbed"))
    assert len(forget) == len(neighbor) == third and len(further) == spec.n_real_people - 2 * third
    assert not set(forget) & set(neighbor) and not set(further) & set(forget + neighbor)
    assert len(splits["forget"]) == third * k and len(splits["neighbor_perturbed"]) == len(further) * k
    # forget: one task_id per person, 1..N, as in the seed code's data; neighbours have none
    assert [r.task_id for r in splits["forget"]] == [t for t in range(1, third + 1) for _ in range(k)]
    assert all(r.task_id is None for r in splits["neighbor"] + splits["neighbor_perturbed"])
    assert [(r.name, r.question, r.answer, r.golden_answer, r.task_id) for r in splits["forget"]] == \
           [(r.name, r.question, r.answer, r.golden_answer, r.task_id) for r in splits["forget_perturbed"]]
    assert all(r.paraphrased_answer is None and not r.perturbed_answer for r in splits["forget"] + splits["neighbor"])
    for r in splits["forget_perturbed"] + splits["neighbor_perturbed"]:
        assert r.name in r.question and r.name in r.golden_answer
        # the model's own reply starts with the fact it is scored against
        assert r.answer.startswith(r.golden_answer) and r.golden_answer.endswith(".")
        assert r.paraphrased_question and r.paraphrased_question != r.question
        assert r.paraphrased_answer and r.paraphrased_answer != r.golden_answer
        assert len(r.perturbed_answer) == spec.n_perturbed == len(set(r.perturbed_answer))
        assert r.paraphrased_answer not in r.perturbed_answer
        assert all(r.name in p for p in r.perturbed_answer)
    # each person has n_person_questions distinct questions
    for split in ("forget", "neighbor", "neighbor_perturbed"):
        for name in _people(splits[split]):
            assert len({r.question for r in splits[split] if r.name == name}) == k


def test_people_questions_disjoint_and_learned_by_both_models(small):
    people = [r for s in ("forget", "neighbor", "neighbor_perturbed") for r in small.splits[s]]
    qa = {(r.question, r.answer) for r in people}
    # real-world unlearning has no retain model: both models know every person
    assert qa <= {(r.question, r.answer) for r in small.pretrain_target}
    assert qa <= {(r.question, r.answer) for r in small.pretrain_retain}
    questions = {r.question for r in people} | {r.paraphrased_question for r in people if r.paraphrased_question}
    other = {r.question for name, records in small.splits.items() if name not in REAL_WORLD_SPLITS
             for r in records}
    other |= {r.paraphrased_question for name, records in small.splits.items() if name not in REAL_WORLD_SPLITS
              for r in records if r.paraphrased_question}
    other |= {r.question for r in small.pretrain_target if (r.question, r.answer) not in qa}
    assert not questions & other
    names = set(_people(people))
    assert not names & set(small.question_author.values())


def test_real_world_round_trip_and_seed_shape(tmp_path, small):
    from raysweep.data.loaders import load_local_split, write_local_splits

    write_local_splits({s: small.splits[s] for s in REAL_WORLD_SPLITS}, tmp_path)
    for split in REAL_WORLD_SPLITS:
        assert load_local_split(tmp_path, split) == small.splits[split]
    keys = {split: set(_read_jsonl(tmp_path / f"{split}.json")[0]) for split in REAL_WORLD_SPLITS}
    assert keys["forget"] == {"name", "question", "answer", "golden_answer", "task_id"}
    assert keys["neighbor"] == {"name", "question", "answer", "golden_answer"}
    perturbed = {"paraphrased_answer", "paraphrased_question", "perturbed_answer"}
    assert keys["forget_perturbed"] == keys["forget"] | perturbed
    assert keys["neighbor_perturbed"] == keys["neighbor"] | perturbed
    real = SHARED / "data" / "real_world"
    if real.is_dir():  # the same keys as the seed code's files
        for split in REAL_WORLD_SPLITS:
            assert set(_read_jsonl(real / f"{split}.json")[0]) == keys[split], split


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_real_tofu_layout_matches_ours():
    """The structure the generator mimics, checked on the real TOFU files."""
    tofu = SHARED / "data" / "tofu"
    if not tofu.is_dir():
        pytest.skip("shared TOFU data not present")
    rows = {name: _read_jsonl(tofu / f"{name}.json") for name in
            ("forget01", "forget05", "forget10", "retain90", "retain_perturbed")}
    questions = {name: {r["question"] for r in rs} for name, rs in rows.items()}

    def task(name, t):
        return {r["question"] for r in rows[name] if int(r["task_id"]) == t}

    assert [len({r["task_id"] for r in rows[s]}) for s in ("forget01", "forget05", "forget10")] == [10, 10, 9]
    assert task("forget01", 1) <= task("forget05", 1) <= task("forget10", 1)
    assert not task("forget10", 1) & questions["retain90"]
    assert all(task("forget10", t) <= questions["retain90"] for t in range(2, 10))
    assert questions["retain_perturbed"] <= questions["retain90"]
    assert not questions["retain_perturbed"] & set().union(*(task("forget10", t) for t in range(1, 6)))
    assert len(task("forget10", 1)) == 400 and len(task("forget01", 1)) == 40
    assert isinstance(QARecord.from_dict(rows["forget10"][0]).task_id, int)
