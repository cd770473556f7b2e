"""``--resume`` of an experiment started before the sweep layer moved into ``raysweep/sweep/``.

``tests/fixtures/old_layout/old`` was written by commit 8cb833d (see its README.md): its
``tuner.pkl`` and searcher state pickle ``raysweep.tune.SpaceBuilder``,
``raysweep.tune.trial_dirname``, ``raysweep.tracking.TrackingCallback`` and
``raysweep.trial.run_trial``. One of its three trials had finished when it was killed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_layout"
OLD_ROOT = "/tmp/rsfix"  # where the fixture was made; its JSON files name it
FAKE_WORKER = f"{Path(__file__).resolve().parent / 'fake_worker.py'}:run"
FINISHED_BEFORE = "6ce88bcb"


def _copy_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "results" / "old"
    shutil.copytree(FIXTURE / "old", path)
    for name in ("sweep.json", "mlflow.json"):  # absolute paths of the place it was made
        file = path / name
        file.write_text(file.read_text().replace(OLD_ROOT, str(tmp_path)))
    return path


def instances_in(obj, cls, depth: int = 6) -> list:
    """Every ``cls`` instance reachable from ``obj`` through dicts, lists, tuples and object
    attributes, at most ``depth`` levels down (e.g. inside a Tune searcher-state pickle)."""
    if isinstance(obj, cls):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return []
    return [found for child in children for found in instances_in(child, cls, depth - 1)]


def test_old_pickles_resolve_to_the_new_modules():
    import raysweep.sweep.space
    import raysweep.sweep.tracking

    raw = (FIXTURE / "old" / "tuner.pkl").read_bytes()
    assert b"raysweep.tracking" in raw and b"raysweep.tune" in raw  # the old module paths
    with open(FIXTURE / "old" / "tuner.pkl", "rb") as f:
        tuner = pickle.load(f)
    tune_config, run_config = tuner["_tune_config"], tuner["_run_config"]
    assert tune_config.trial_dirname_creator is raysweep.sweep.space.trial_dirname
    assert [type(c) for c in run_config.callbacks] == [raysweep.sweep.tracking.TrackingCallback]
    assert run_config.callbacks[0].experiment_path == f"{OLD_ROOT}/results/old"

    with open(next((FIXTURE / "old").glob("searcher-state-*.pkl")), "rb") as f:
        state = f.read()
    assert b"raysweep.tune" in state and b"SpaceBuilder" in state
    found = instances_in(pickle.loads(state), raysweep.sweep.space.SpaceBuilder)
    assert found and found[0].methods == ["ME+GD", "NPO+GD"]
    assert found[0].keys_for("NPO+GD")[-2:] == ["beta", "lora_r"] and "beta" not in found[0].keys_for("ME+GD")


@pytest.mark.slow
def test_old_layout_experiment_resumes_with_the_new_code(tmp_path):
    path = _copy_fixture(tmp_path)
    log = tmp_path / "fake_log.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSWEEP_", "RAY_ADDRESS"))}
    env.update(
        RAYSWEEP_WORKER=FAKE_WORKER, RAYSWEEP_FAKE_LOG=str(log), RAYSWEEP_FAKE_SLEEP="0.2",
        RAYSWEEP_OBJECT_STORE_MB="200", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
    )
    out = tmp_path / "resume.log"
    with open(out, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "raysweep.tune", "--space", str(FIXTURE / "space.yaml"),
             "--storage", str(tmp_path / "results"), "--name", "old", "--resume"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=400,
        )
    text = out.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    trials = json.loads((path / "trials.json").read_text())
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" for t in trials), trials
    assert all(len(t["history"]) == 2 and "objective" in t["best"] for t in trials)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    started = {Path(e["trial"]).parent.name for e in events if e["event"] == "start"}
    assert f"run_trial_{FINISHED_BEFORE}" not in started and len(started) == 2  # only the work left
    best = json.loads((path / "best.json").read_text())
    assert best["trial_id"] in {t["trial_id"] for t in trials}
    assert (path / "report.md").is_file()
    # MLflow: the resumed sweep has a parent run in the new store with one child run per trial.
    from raysweep.sweep.mlflow_store import TAG_PARENT, TAG_TRIAL, client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("raysweep-oldlayout")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = json.loads((path / "mlflow.json").read_text())["parent_run_id"]
    children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent_id]
    assert sorted(r.data.tags[TAG_TRIAL] for r in children) == sorted(t["trial_id"] for t in trials)
    assert all(r.info.status == "FINISHED" for r in runs)
