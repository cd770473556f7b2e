"""The trial entry point: downstream lm-eval scores join the last report of a real run."""

from __future__ import annotations

import pytest

from raysweep.eval.downstream import DownstreamConfig
from raysweep.runner import run_experiment

from test_downstream import task_dir  # noqa: F401  (the module's local lm-eval tasks fixture)
from test_train import experiment


@pytest.mark.parametrize("include", [pytest.param(False, marks=pytest.mark.slow), True])
def test_downstream_scores_reach_the_last_report(embedded, embedded_specs, task_dir, include):  # noqa: F811
    cfg = experiment(embedded_specs, method="ME+GD", epochs=2)
    cfg.eval.downstream = DownstreamConfig(tasks=["toy_mc"], include_path=str(task_dir),
                                           include_defaults=False, batch_size=4)
    cfg.eval.objective_includes_downstream = include
    reports = []
    result = run_experiment(cfg, reports.append)
    assert [r.epoch for r in reports] == [1, 2]
    assert "downstream/toy_mc" not in reports[0].metrics
    last = reports[-1].metrics
    assert 0 <= last["downstream/toy_mc"] <= 1
    plain = (last["MU"] + last["FE"]) / 2
    if include:
        assert last["objective"] == pytest.approx((last["MU"] + last["FE"] + last["downstream/toy_mc"]) / 3)
    else:
        assert last["objective"] == pytest.approx(plain)
    assert result.history[-1]["downstream/toy_mc"] == last["downstream/toy_mc"]
