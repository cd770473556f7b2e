"""A Ray Train worker process killed mid-epoch (issue #18, item 3).

The fake worker SIGKILLs its own Train worker process in epoch 2 (``RAYSWEEP_FAKE_KILL``), as the
kernel's OOM killer or a lost node would: a real SIGKILL, not an exception. One sweep of three
trials (the three methods' default points, in this order) with ``search.max_failures: 1``:

* ME+GD is killed once: Tune retries it and it finishes (both epochs, once each in MLflow);
* GA+GD is killed twice (the first attempt and its one retry): it is ERRORED with the reason;
* NPO+GD is never killed.

Every MLflow child run ends terminal (none RUNNING), and the sweep ends with a best trial.
"""

from __future__ import annotations

import json

import pytest

from test_tune import fake_env, fake_events, run_cli, tail, write_yaml

SPACE = {
    "experiment": {"name": "killed", "training": {"lr": 1e-5, "epochs": 2}},
    "search": {"methods": ["ME+GD", "GA+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
               "num_samples": 3, "max_concurrent": 1, "max_failures": 1, "scheduler": {"type": "none"}},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_is_retried_or_errored_with_the_reason(tmp_path):
    space = write_yaml(tmp_path / "space.yaml", SPACE)
    env = fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="0.3", RAYSWEEP_FAKE_KILL="ME+GD:1,GA+GD:2")
    log = tmp_path / "driver.log"
    path = tmp_path / "results" / "exp"
    proc = run_cli(["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "exp",
                    "--set", "tracking.log_generations=false"], env, log)
    assert proc.returncode == 0, tail(log)

    kills = [e["method"] for e in fake_events(tmp_path) if e["event"] == "killed"]
    assert sorted(kills) == ["GA+GD", "GA+GD", "ME+GD"], kills  # the kills really happened
    trials = {t["params"]["method"]: t for t in json.loads((path / "trials.json").read_text())}
    assert set(trials) == {"ME+GD", "GA+GD", "NPO+GD"}
    retried, errored, untouched = trials["ME+GD"], trials["GA+GD"], trials["NPO+GD"]
    assert retried["status"] == "TERMINATED" and [r["epoch"] for r in retried["history"]] == [1, 2]
    assert untouched["status"] == "TERMINATED"
    assert errored["status"] == "ERROR"
    # The reason says what happened to the worker, in one line (not a traceback, not "errored").
    reason = errored["error"] or ""
    assert "died" in reason.lower() or "killed" in reason.lower() or "sigkill" in reason.lower(), reason
    assert "\n" not in reason and len(reason) < 400, reason

    best = json.loads((path / "best.json").read_text())
    assert best["params"]["method"] in ("ME+GD", "NPO+GD") and best["status"] == "TERMINATED"
    assert best["trials"]["errored"] == 1 and best["trials"]["finished"] == 2

    from raysweep.sweep.mlflow_store import TAG_ERROR, TAG_PARENT, TAG_TRIAL, client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = {r.data.tags[TAG_TRIAL]: r for r in runs if TAG_PARENT in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(t["trial_id"] for t in trials.values())  # one run per trial, retries included
    status = {m: children[t["trial_id"]].info.status for m, t in trials.items()}
    assert status == {"ME+GD": "FINISHED", "GA+GD": "FAILED", "NPO+GD": "FINISHED"}, status
    assert children[errored["trial_id"]].data.tags[TAG_ERROR] == reason
    history = client.get_metric_history(children[retried["trial_id"]].info.run_id, "objective")
    assert sorted(m.step for m in history) == [1, 2]  # epoch 1 of the killed attempt logged once


def test_worker_death_is_named_in_one_line_and_other_errors_are_not():
    from ray.exceptions import ActorDiedError

    from raysweep.sweep.results import error_reason
    from raysweep.sweep.trial import worker_death_message

    class WorkerGroupError(RuntimeError):  # the shape of ray.train.WorkerGroupError
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    died = ActorDiedError()
    died.args = ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
                 "Worker exit detail: Worker unexpectedly exits with a connection error code 2.",)
    message = worker_death_message(WorkerGroupError({0: died}))
    assert message is not None and message.startswith("WorkerDied: the Train worker process of rank 0 died")
    assert worker_death_message(WorkerGroupError({0: ValueError("bad batch")})) is None
    assert worker_death_message(RuntimeError("out of memory")) is None
    error_txt = f"Traceback (most recent call last):\n  File \"x\"\nraysweep.sweep.trial.TrialWorkerDied: {message}\n"
    assert error_reason(error_txt) == message
