"""`ray up` rehearsed on this machine: cluster-local.yaml under Ray's fake multi-node autoscaler.

The head provides only `trial_driver` (CPU 0), so both trials' Train workers need nodes the
autoscaler must add. The trials use the fast fake worker (tests/fake_worker.py); the real
tiny.yaml sweep on the same harness is `python bench/cluster_rehearsal.py` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import cluster_rehearsal  # noqa: E402


@pytest.mark.slow
def test_autoscaler_adds_worker_nodes_trials_run_there_mlflow_records_and_teardown_is_clean(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "experiment": {"name": "rehearsal", "training": {"lr": 1e-5, "epochs": 2}},
        "search": {"methods": ["ME+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
                   "num_samples": 2, "max_concurrent": 2, "scheduler": {"type": "none"},
                   "resources": {"num_workers": 1, "cpus_per_worker": 1}},
        "tracking": {"experiment": "raysweep-rehearsal"},
    }))
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSWEEP_", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAYSWEEP_WORKER=f"{REPO / 'tests' / 'fake_worker.py'}:run", RAYSWEEP_FAKE_SLEEP="1",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    summary = cluster_rehearsal.rehearse(str(space), tmp_path / "out", env=env, timeout_s=480)
    log = (tmp_path / "out" / "sweep.log").read_text(errors="replace")[-3000:]
    assert summary["sweep_exit"] == 0, log
    assert summary["nodes_at_start"] == 1  # the head only
    assert summary["worker_nodes_added"] >= 1, summary
    head = cluster_rehearsal.HEAD_NODE_ID[-5:]
    assert len(summary["train_worker_nodes"]) == 2 and head not in summary["train_worker_nodes"], summary
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    children = [r for r in summary["mlflow_runs"] if r["parent"]]
    parents = [r for r in summary["mlflow_runs"] if not r["parent"]]
    assert len(children) == 2 and len(parents) == 1
    assert all(r["status"] == "FINISHED" and "objective" in r["metrics"] for r in children)
    assert summary["processes_left_after_teardown"] == []
    assert cluster_rehearsal.marked_pids(summary["marker"]) == []
