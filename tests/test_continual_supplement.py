"""Continual unlearning data: the retain top-up never comes from evaluation data, and
unscheduled subtasks stay in the retain set (seed ``forget.py:44-47``).  Data only, no model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysweep.config import ExperimentConfig
from raysweep.data.synthetic import SyntheticSpec, general_supplement, generate
from raysweep.scenarios import (
    SupplementError, continual_tasks, load_step_data, load_supplement, preflight_data, resolve,
)

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def seed_dir(path: Path, n_tasks: int = 4) -> Path:
    """A seed-layout directory: ``n_tasks`` forget subtasks of 2 questions, 3 retain questions."""
    path.mkdir(parents=True, exist_ok=True)
    pert = lambda a: {"paraphrased_answer": a + " indeed", "perturbed_answer": [a + " not", a + " never"]}  # noqa: E731
    forget = [{"question": f"Who is forget author {t}.{i}?", "answer": f"Author {t}.{i} writes.", "task_id": t}
              for t in range(1, n_tasks + 1) for i in range(2)]
    retain = [{"question": f"Who is retain author {i}?", "answer": f"Retain {i} writes plays."} for i in range(3)]
    general = [{"question": f"What is fact {i}?", "answer": f"fact {i}", "perturbed_answer": ["x", "y", "z"],
                "original_answer": f"The fact is fact {i}."} for i in range(2)]
    _write(path / "forget10.json", forget)
    _write(path / "forget10_perturbed.json", [{**r, **pert(r["answer"])} for r in forget])
    _write(path / "retain90.json", retain)
    _write(path / "retain_perturbed.json", [{**r, **pert(r["answer"])} for r in retain])
    _write(path / "real_authors_perturbed.json", general)
    _write(path / "world_facts_perturbed.json", general)
    _write(path / "alpaca_like.json", [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
                                      {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}])
    return path


def local_cfg(data_dir: Path, **continual) -> ExperimentConfig:
    cfg = ExperimentConfig.model_validate({
        "scenario": "continual",
        "model": {"name_or_path": "some-org/some-model"},  # never loaded: data only
        "data": {"source": "local", "path": str(data_dir), "task_ids": None},
        "continual": continual,
    })
    return cfg


def test_unscheduled_tasks_stay_in_retain(tmp_path):
    cfg = local_cfg(seed_dir(tmp_path / "d"), steps=2)
    resolved = resolve(cfg)
    tasks = continual_tasks(cfg, resolved)
    assert tasks == [1, 2]
    for step, expected_tasks in ((0, {2, 3, 4}), (1, {3, 4})):
        data = load_step_data(cfg, resolved, tasks, step)
        retained_tasks = {r.task_id for r in data.retain if r.task_id is not None}
        # seed forget.py:44: every task not yet unlearned, scheduled or not
        assert retained_tasks == expected_tasks
        assert len(data.retain) == 3 + 2 * len(expected_tasks)
        assert {r.task_id for r in data.forget} == {tasks[step]}


def test_tasks_outside_task_ids_stay_in_retain(tmp_path):
    cfg = local_cfg(seed_dir(tmp_path / "d"))
    cfg.data.task_ids = [2, 3]
    resolved = resolve(cfg)
    tasks = continual_tasks(cfg, resolved)
    assert tasks == [2, 3]
    data = load_step_data(cfg, resolved, tasks, 0)
    assert {r.task_id for r in data.retain if r.task_id is not None} == {1, 3, 4}


def test_supplement_file_tops_up_and_alpaca_is_read(tmp_path):
    d = seed_dir(tmp_path / "d")
    cfg = local_cfg(d, retain_min_size=20, supplement_path=str(d / "alpaca_like.json"))
    resolved = resolve(cfg)
    tasks = continual_tasks(cfg, resolved)
    data = load_step_data(cfg, resolved, tasks, len(tasks) - 1)
    assert len(data.retain) == 20
    questions = {r.question for r in data.retain}
    assert {"Name a colour.", "Add the numbers.\n2 and 3"} <= questions
    supplement = questions - {f"Who is retain author {i}?" for i in range(3)}
    assert supplement == {"Name a colour.", "Add the numbers.\n2 and 3"}
    assert not supplement & {r.question for s in data.eval_sets.values() for r in s.records}


def test_supplement_overlapping_an_eval_set_is_refused(tmp_path):
    d = seed_dir(tmp_path / "d")
    cfg = local_cfg(d, retain_min_size=20, supplement_split="world_facts_perturbed")
    resolved = resolve(cfg)
    with pytest.raises(SupplementError) as err:
        load_step_data(cfg, resolved, continual_tasks(cfg, resolved), 0)
    assert err.value.key == "experiment.continual.supplement_split"
    assert "world_facts_perturbed" in err.value.message
    # a file that repeats one evaluated question is refused too
    rows = [{"question": "Name a colour.", "answer": "Red."}, {"question": "What is fact 1?", "answer": "x"}]
    _write(d / "mixed.jsonl", rows)
    cfg = local_cfg(d, retain_min_size=20, supplement_path=str(d / "mixed.jsonl"))
    with pytest.raises(SupplementError, match="real_authors_perturbed"):
        load_supplement(cfg, resolve(cfg))


def test_non_synthetic_source_must_name_a_supplement(tmp_path):
    cfg = local_cfg(seed_dir(tmp_path / "d"), retain_min_size=20)
    with pytest.raises(SupplementError, match="supplement_path"):
        load_supplement(cfg, resolve(cfg))


def test_embedded_supplement_is_disjoint_from_every_split():
    spec = SyntheticSpec()
    extra = general_supplement(spec)
    assert len(extra) == len({r.question for r in extra}) == 200
    corpus = generate(spec)
    every = {r.question for records in corpus.splits.values() for r in records}
    every |= {r.question for r in corpus.pretrain_target + corpus.pretrain_retain}
    assert not every & {r.question for r in extra}
    assert general_supplement(spec) == extra  # deterministic


def test_preflight_refuses_overlapping_supplement_on_synthetic(capsys):
    cfg = ExperimentConfig.model_validate({
        "scenario": "continual", "data": {"task_ids": None},
        "continual": {"retain_min_size": 5000, "supplement_split": "world_facts_perturbed"},
    })
    with pytest.raises(SystemExit) as exit_:
        preflight_data(cfg)
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "experiment.continual.supplement_split" in line and "world_facts" in line
    cfg.continual.supplement_split = None  # the embedded general-QA default passes
    preflight_data(cfg)


def test_cli_overlap_exits_2_before_ray(tmp_path):
    doc = yaml.safe_load((ROOT / "search_spaces" / "continual.yaml").read_text())
    doc["experiment"]["continual"] = {"retain_min_size": 500, "supplement_split": "real_authors_perturbed"}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "raysweep.unlearn", "--config", str(space)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "experiment.continual.supplement_split" in lines[0]


def test_holdout_of_the_privacy_attacks_is_evaluation_data_too(capsys):
    cfg = ExperimentConfig.model_validate({
        "scenario": "continual", "data": {"task_ids": None},
        "continual": {"retain_min_size": 5000, "supplement_split": "holdout"},
    })
    with pytest.raises(SystemExit):
        preflight_data(cfg)
    assert "'holdout'" in capsys.readouterr().err
