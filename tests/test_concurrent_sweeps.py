"""Two sweeps started together from one directory (issue #18, item 4).

Same working directory, same storage root, same new ``mlflow.db``, same experiment name and no
``--name``: both generate ``concurrent-<timestamp>``, usually in the same second. Both must
finish with all their trials, each in its own experiment directory, and in MLflow each parent
run holds exactly its own sweep's trials, with no "database is locked" on the way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_tune import fake_env, tail, write_yaml

SPACE = {
    "experiment": {"name": "concurrent", "training": {"lr": 1e-5, "epochs": 2}},
    "search": {"methods": ["ME+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
               "num_samples": 2, "max_concurrent": 1, "scheduler": {"type": "none"}},
}


def test_a_generated_name_moves_on_and_a_given_one_is_refused_while_held(tmp_path):
    from raysweep.sweep.storage import ExperimentBusy, claim_experiment, release_experiment

    storage = str(tmp_path / "results")
    assert claim_experiment(storage, "exp-1", rename=True) == "exp-1"
    assert claim_experiment(storage, "exp-1", rename=True) == "exp-1-2"  # held: the next name
    with pytest.raises(ExperimentBusy, match="another sweep .*exp-1"):
        claim_experiment(storage, "exp-1", rename=False)
    release_experiment(storage, "exp-1")
    assert claim_experiment(storage, "exp-1", rename=False) == "exp-1"  # free again
    # A directory holding an earlier experiment is not a new sweep's, even when unlocked.
    (tmp_path / "results" / "old").mkdir()
    (tmp_path / "results" / "old" / "experiment_state-2026-12-02_10-00-00.json").write_text("{}")
    assert claim_experiment(storage, "old", rename=True) == "old-2"


def test_a_lock_dies_with_its_process(tmp_path):
    from raysweep.sweep.storage import claim_experiment

    storage = str(tmp_path / "results")
    code = ("import os; from raysweep.sweep.storage import claim_experiment as c; "
            f"c({storage!r}, 'exp', rename=False); os._exit(9)")  # no release: a crash
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert claim_experiment(storage, "exp", rename=False) == "exp"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_sweeps_started_together_in_one_directory(tmp_path):
    space = write_yaml(tmp_path / "space.yaml", SPACE)
    env = fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="0.2", RAYSWEEP_NUM_CPUS="1")
    storage = tmp_path / "results"
    args = [sys.executable, "-m", "raysweep.tune", "--space", str(space), "--storage", str(storage),
            "--set", "tracking.log_generations=false"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    handles = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=h, stderr=subprocess.STDOUT) for h in handles]
    codes = [p.wait(timeout=850) for p in procs]
    for h in handles:
        h.close()
    for code, log in zip(codes, logs):
        assert code == 0, tail(log)
        assert "database is locked" not in log.read_text(), tail(log)

    experiments = sorted(p for p in storage.iterdir() if (p / "trials.json").exists())
    assert len(experiments) == 2, sorted(p.name for p in storage.iterdir())
    trial_ids = {}
    for path in experiments:
        trials = json.loads((path / "trials.json").read_text())
        assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials), trials
        assert all([r["epoch"] for r in t["history"]] == [1, 2] for t in trials)
        trial_ids[path.name] = sorted(t["trial_id"] for t in trials)
    assert not set(trial_ids[experiments[0].name]) & set(trial_ids[experiments[1].name])

    from raysweep.sweep.mlflow_store import TAG_PARENT, TAG_TRIAL, client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    by_parent = {}
    for r in runs:
        if TAG_PARENT in r.data.tags:
            by_parent.setdefault(r.data.tags[TAG_PARENT], []).append(r.data.tags[TAG_TRIAL])
            assert r.info.status == "FINISHED"
    assert sorted(sorted(v) for v in by_parent.values()) == sorted(trial_ids.values())
    assert set(by_parent) == {p.info.run_id for p in parents}


def test_a_held_name_or_resume_exits_2_with_one_line(tmp_path, capsys):
    import argparse

    from raysweep.sweep.storage import claim_experiment
    from raysweep.tune import claim

    storage = str(tmp_path / "results")
    claim_experiment(storage, "exp", rename=False)  # another sweep holds it
    for resume, flag in ((False, "--name"), (True, "--resume")):
        with pytest.raises(SystemExit) as exit_info:
            claim(argparse.Namespace(name="exp", resume=resume), storage, "exp")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and flag in err and "another sweep" in err, err
    assert claim(argparse.Namespace(name=None, resume=False), storage, "exp") == "exp-2"
