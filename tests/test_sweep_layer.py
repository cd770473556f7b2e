"""The ideas the sweep layer now takes from one place: the objective, the method facts of
``raysweep.losses``, the one Pareto front (``best.json`` and ``report.md`` agree), early
stopping, and a worker report without an objective."""

from __future__ import annotations

import pytest

from raysweep.eval.metrics import objective
from raysweep.losses import FORGET_LOSSES, METHODS, REGULARIZERS, parse_method
from raysweep.sweep.report_data import from_summaries, pareto_points
from raysweep.sweep.results import FINISHED, best_row, early_stopped, pareto_front
from raysweep.sweep.summary import sweep_pareto_front


def test_objective_is_the_mean_of_mu_fe_and_any_extra_scores():
    assert objective(0.8, 0.4) == pytest.approx(0.6)
    assert objective(0.9, 0.3, 0.6) == pytest.approx(0.6)
    assert objective(1.0, 0.0, 0.5, 0.5) == pytest.approx(0.5)


def test_method_facts_live_on_the_spec():
    assert {n for n, s in FORGET_LOSSES.items() if s.uses_beta} == {"NPO", "DPO"}
    assert {n for n, s in REGULARIZERS.items() if s.uses_beta} == {"AP"}
    uses = {m for m in METHODS if parse_method(m).uses_beta}
    assert uses == {"NPO+GD", "NPO+KL", "DPO+GD", "DPO+KL", "IDK+AP", "DPO+AP"}
    assert parse_method("ME+GD").paper_defaults == {"forget_coeff": 0.1, "reg_coeff": 1.0, "beta": 0.1}
    assert parse_method("ME+KL").paper_defaults["forget_coeff"] == 1.0
    assert all(parse_method(m).paper_defaults["beta"] == 0.1 for m in METHODS)


def _row(epoch, mu, fe):
    return {"epoch": epoch, "MU": mu, "FE": fe, "objective": (mu + fe) / 2}


def _summary(trial_id, rows, status=FINISHED, epochs=3):
    best = best_row(rows)
    return {"trial_id": trial_id, "status": status, "params": {"method": "GA+GD", "epochs": epochs},
            "history": rows, "best": best, "last": rows[-1] if rows else None, "checkpoint": f"/ck/{trial_id}",
            "early_stopped": early_stopped(status, epochs, rows[-1] if rows else None), "error": None,
            "best_epoch": best and best["epoch"]}


SUMMARIES = [
    _summary("a", [_row(1, 0.9, 0.2), _row(2, 0.85, 0.5), _row(3, 0.7, 0.8)]),
    _summary("b", [_row(1, 0.95, 0.1), _row(2, 0.6, 0.3)], epochs=2),  # epoch 2 dominated by a's
    _summary("c", [_row(1, 0.99, 0.99)], status="ERROR"),  # not finished: not on the front
]


def test_best_json_and_the_report_have_the_same_pareto_front():
    report_front = [(t.trial_id, r["epoch"]) for t, r in pareto_points(from_summaries(SUMMARIES))]
    assert report_front == [("b", 1), ("a", 1), ("a", 2), ("a", 3)]
    entries = sweep_pareto_front(SUMMARIES)
    assert [e["trial_id"] for e in entries] == ["b", "a"]
    from_best = sorted((e["trial_id"], p["epoch"]) for e in entries for p in e["front_epochs"])
    assert from_best == sorted(report_front)
    a = entries[1]
    assert (a["epoch"], a["MU"], a["FE"]) == (3, 0.7, 0.8)  # the trial's best objective on the front


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    points = [("x", {"MU": 0.5, "FE": 0.5}), ("y", {"MU": 0.5, "FE": 0.5}), ("z", {"MU": 0.4, "FE": 0.5}),
              ("w", {"MU": 0.6})]
    assert [k for k, _ in pareto_front(points)] == ["x", "y"]


def test_early_stopped_only_for_finished_trials_short_of_their_epochs():
    assert early_stopped(FINISHED, 3, {"epoch": 1})
    assert not early_stopped(FINISHED, 3, {"epoch": 3})
    assert not early_stopped("ERROR", 3, {"epoch": 1})
    assert not early_stopped(FINISHED, None, {"epoch": 1}) and not early_stopped(FINISHED, 3, None)


class _Context:
    def get_world_rank(self):
        return 1


@pytest.mark.parametrize("metrics, message", [
    ({"MU": 0.5, "FE": 0.5}, "no numeric 'objective'"),
    ({"MU": 0.5, "FE": 0.5, "objective": float("nan")}, "objective is nan"),
])
def test_a_report_without_a_finite_objective_fails_the_trial(monkeypatch, metrics, message):
    import ray.train

    from raysweep.sweep.trial import RayReporter

    reported = []
    monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
    monkeypatch.setattr(ray.train, "report", lambda m, **kw: reported.append(m))
    reporter = RayReporter(None)
    reporter({"epoch": 1, "MU": 0.5, "FE": 0.5, "objective": 0.5})
    assert reported == [{"epoch": 1, "MU": 0.5, "FE": 0.5, "objective": 0.5, "objective_best": 0.5}]
    with pytest.raises(ValueError, match=message):
        reporter({"epoch": 2, **metrics})
    assert len(reported) == 1
