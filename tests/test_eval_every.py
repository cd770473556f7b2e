"""``experiment.eval.every: rungs``: a trial evaluates and reports only where ASHA decides (its rung
epochs, ``max_t``) and at its last epoch; ASHA's clock is the reported epoch, so it takes the same
decisions as on a report per epoch. Also: the MLflow tag of an evaluation that fell back to the
hooked ZeRO-3 path."""

from __future__ import annotations

import json
import pickle

import pytest

import fake_worker
from test_tune import expected_asha_stops, fake_env, run_cli, tail, write_yaml

from raysweep.config import SweepConfig
from raysweep.eval.schedule import evaluation_epochs, rung_epochs, rung_milestones


@pytest.mark.parametrize("grace,rf,max_t", [(1, 2, 3), (1, 2, 4), (1, 2, 6), (2, 3, 20), (1, 1.5, 5), (3, 2, 3),
                                            (1, 3, 9), (2, 2, 16), (1, 4, 100)])
def test_rung_milestones_are_rays(grace, rf, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    assert rung_milestones(grace, rf, max_t) == sorted(m for m, _ in bracket._rungs)


def test_rung_epochs_and_evaluation_epochs():
    assert rung_epochs(1, 2, 6) == [1, 2, 4, 6]  # milestones 1, 2, 4 and max_t
    assert rung_epochs(1, 2, 4) == [1, 2, 4]
    assert rung_epochs(2, 3, 20) == [2, 6, 18, 20]
    assert rung_epochs(1, 1.5, 5) == [1, 2, 3, 4, 5]  # 1.5 -> 2, 2.25 -> 3, 3.375 -> 4: first epoch at or after
    assert rung_epochs(3, 2, 3) == [3]
    assert evaluation_epochs("epoch", 4) == [1, 2, 3, 4]
    assert evaluation_epochs("rungs", 10, [1, 2, 4, 6]) == [1, 2, 4, 6, 10]  # and the trial's last epoch
    assert evaluation_epochs("rungs", 3, [1, 2, 4, 6]) == [1, 2, 3]  # rungs past the trial's end dropped
    assert evaluation_epochs("rungs", 5, []) == [5]  # no scheduler: the last epoch only
    assert evaluation_epochs("last", 5, [1, 2]) == [5]
    with pytest.raises(ValueError, match="eval.every"):
        evaluation_epochs("sometimes", 5)


SWEEP = {
    "experiment": {"name": "rungs", "eval": {"every": "rungs"}, "training": {"lr": 1e-5, "epochs": 6}},
    "search": {
        "methods": ["NPO+GD"],
        "space": {"lr": {"loguniform": [1e-6, 1e-4]}, "epochs": 6, "forget_coeff": {"uniform": [0.05, 1.0]},
                  "beta": {"loguniform": [0.05, 0.5]}},
        "num_samples": 4,
        "max_concurrent": 1,  # one trial at a time: ASHA's stops are computable (tests/test_tune.py)
        "seed": 5,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    },
}


def test_the_sweep_hands_trials_their_rung_epochs_and_asha_counts_epochs():
    from raysweep.sweep.space import SpaceBuilder, build_scheduler
    from raysweep.sweep.trial import TrialSetup

    sweep = SweepConfig.model_validate(SWEEP)
    setup = TrialSetup.from_sweep(sweep, "/tmp/unused")
    assert setup.experiment["eval"]["rung_epochs"] == [1, 2, 4, 6]
    assert build_scheduler(sweep, SpaceBuilder(sweep))._time_attr == "epoch"
    continual = SweepConfig.model_validate({**SWEEP, "experiment": {**SWEEP["experiment"], "scenario": "continual"}})
    assert build_scheduler(continual, SpaceBuilder(continual))._time_attr == "step"
    none = SweepConfig.model_validate({**SWEEP, "search": {**SWEEP["search"], "scheduler": {"type": "none"}}})
    assert TrialSetup.from_sweep(none, "/tmp/unused").experiment["eval"]["rung_epochs"] == []


def test_the_worker_evaluates_only_at_the_rung_epochs_and_the_last(embedded, embedded_specs):
    from test_train import experiment

    from raysweep.train import run_unlearning

    cfg = experiment(embedded_specs, epochs=5, effective_batch_size=8, per_device_batch_size=8)
    cfg.eval.every, cfg.eval.rung_epochs = "rungs", [1, 2, 4]
    calls = []

    def evaluator(model, tokenizer):
        calls.append(1)
        return {"MU": 0.5, "FE": 0.5, "objective": 0.5}, {}

    reports = []
    run_unlearning(cfg, reports.append, evaluator=evaluator)
    assert [r.epoch for r in reports] == [1, 2, 4, 5] and len(calls) == 4
    cfg.eval.every = "epoch"
    reports.clear()
    run_unlearning(cfg, reports.append, evaluator=evaluator)
    assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rungs_sweep_reports_only_at_rungs_and_asha_stops_at_the_right_rung(tmp_path):
    """A real sweep (fake worker) under eval.every: rungs: every trial reports at epochs 1, 2, 4, 6
    (rungs 1, 2, 4 of grace 1, rf 2; max_t 6) only; ASHA stops exactly the trials a replay of its
    rule on the known curves stops, at the same rungs; MLflow's metric steps are those epochs."""
    from raysweep.sweep.mlflow_store import child_runs, client_for, read_run_file

    space = write_yaml(tmp_path / "space.yaml", SWEEP)
    env = fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="0.1")
    log = tmp_path / "driver.log"
    proc = run_cli(["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "sweep",
                    "--set", "tracking.log_generations=false"], env, log)
    assert proc.returncode == 0, tail(log)
    path = tmp_path / "results" / "sweep"
    trials = json.loads((path / "trials.json").read_text())
    assert len(trials) == 4
    expected = expected_asha_stops(trials, [1, 2, 4], 2, {})
    assert any(e is not None for e in expected.values()), ("the sweep must exercise a stop", expected)
    assert any(e is None for e in expected.values()), ("and a trial that runs to the end", expected)
    run_file = read_run_file(str(path))
    client = client_for(run_file["tracking_uri"])
    runs = {r.data.tags["raysweep.trial_id"]: r for r in
            child_runs(client, run_file["experiment_id"], run_file["parent_run_id"])}
    for t in trials:
        stop = expected[t["trial_id"]]
        reported = [1, 2, 4, 6] if stop is None else [e for e in (1, 2, 4) if e <= stop]
        assert [row["epoch"] for row in t["history"]] == reported, (t["trial_id"], stop, t["history"])
        assert t["early_stopped"] == (stop is not None)
        for row in t["history"]:
            assert row["objective"] == pytest.approx(
                fake_worker.objective(t["params"]["lr"], t["params"]["forget_coeff"], row["epoch"]), rel=1e-12)
        steps = [m.step for m in client.get_metric_history(runs[t["trial_id"]].info.run_id, "objective")]
        assert sorted(steps) == reported


def test_a_fallback_evaluation_tags_the_trial_run(tmp_path):
    from types import SimpleNamespace

    from raysweep.sweep.mlflow_store import child_runs, client_for
    from raysweep.sweep.tracking import EVAL_FALLBACK, TAG_EVAL_WEIGHTS, SweepTracker, tune_callback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = SweepConfig.model_validate({**SWEEP, "tracking": {"uri": uri}})
    path = str(tmp_path / "exp")
    tracker = SweepTracker.start(sweep, path)
    callback = pickle.loads(pickle.dumps(tune_callback(sweep, path)))
    callback.setup()
    trials = [SimpleNamespace(trial_id=f"t000000{i}", config={"method": "NPO+GD", "lr": 1e-5, "epochs": 6},
                              last_result={}, error_file=None) for i in (1, 2)]
    for trial, fallback in zip(trials, (0.0, 1.0)):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"epoch": 1, "MU": 0.5, "FE": 0.5, "objective": 0.5,
                                                "eval/gathered": 1.0 - fallback, "eval/gather_fallback": fallback})
    client = client_for(uri)
    tags = {r.data.tags["raysweep.trial_id"]: r.data.tags.get(TAG_EVAL_WEIGHTS)
            for r in child_runs(client, tracker.experiment_id, tracker.parent_run_id)}
    assert tags == {"t0000001": None, "t0000002": EVAL_FALLBACK}
