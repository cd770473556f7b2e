"""Continual unlearning on the session's small embedded model."""

from __future__ import annotations

import pytest
import torch

import raysweep.train as train
from raysweep.continual import run_continual, step_objective
from raysweep.scenarios import continual_tasks, load_step_data, resolve

from test_train import experiment


def continual_cfg(specs, method="NPO+GD", reference="previous", steps=3):
    cfg = experiment(specs, method=method)
    cfg.scenario = "continual"
    cfg.data.task_ids = None
    cfg.continual.steps = steps
    cfg.continual.reference = reference
    return cfg


def test_retain_set_shrinks_and_supplement_tops_it_up(embedded, embedded_specs):
    cfg = continual_cfg(embedded_specs)
    resolved = resolve(cfg)
    tasks = continual_tasks(cfg, resolved)
    assert tasks == sorted(tasks) and len(tasks) == 3
    sizes, forgets = [], []
    for step in range(3):
        data = load_step_data(cfg, resolved, tasks, step)
        forget_q = {r.question for r in data.forget}
        assert not forget_q & {r.question for r in data.retain}
        assert {r.task_id for r in data.forget} == {tasks[step]}
        sizes.append(len(data.retain))
        forgets.append(forget_q)
    assert sizes[0] > sizes[1] > sizes[2]
    # the subtask unlearned at step 1 was part of the retain set at step 0
    assert forgets[1] <= {r.question for r in load_step_data(cfg, resolved, tasks, 0).retain}

    cfg.continual.retain_min_size = sizes[0] + 5
    topped = load_step_data(cfg, resolved, tasks, 2)
    assert len(topped.retain) == sizes[0] + 5


def test_step_objective():
    assert step_objective([0.2, 0.4, 0.9], "mean") == pytest.approx(0.5)
    assert step_objective([0.2, 0.4, 0.9], "final") == 0.9


@pytest.mark.parametrize("method", ["NPO+GD", pytest.param("ME+GD", marks=pytest.mark.slow)])
def test_three_steps_report_per_step(embedded, embedded_specs, method):
    reports = []
    result = run_continual(continual_cfg(embedded_specs, method=method), reports.append)
    assert [r.metrics["step"] for r in reports] == [1, 2, 3]
    retain_sizes = [r.metrics["data/retain_size"] for r in reports]
    assert retain_sizes[0] > retain_sizes[1] > retain_sizes[2]
    steps = [r.metrics["objective_step"] for r in reports]
    assert reports[-1].metrics["objective"] == pytest.approx(sum(steps) / 3)
    for r in reports:
        assert 0 <= r.metrics["MU"] <= 1 and 0 <= r.metrics["FE"] <= 1
    assert len(result.history) == 3


def test_reference_policy_is_honoured(embedded, embedded_specs, monkeypatch):
    """At step 2, `previous` anchors NPO to the step-1 model, `initial` to the original one."""
    real = train.collect_reference_logps
    seen: dict[str, list[torch.Tensor]] = {}

    def recording(policy):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.setdefault(policy, []).append(out["forget_nll"].clone())
            return out
        return wrapped

    for policy in ("previous", "initial"):
        monkeypatch.setattr(train, "collect_reference_logps", recording(policy))
        cfg = continual_cfg(embedded_specs, method="NPO+GD", reference=policy, steps=2)
        cfg.training.lr = 3e-3
        run_continual(cfg, None)
    assert torch.allclose(seen["previous"][0], seen["initial"][0])  # step 1: both the original
    assert not torch.allclose(seen["previous"][1], seen["initial"][1])  # step 2: they differ
