"""The real thing, small: ``python -m raysweep.tune`` on the session's embedded model.

Ray Tune + Optuna + ASHA, a Ray Train TorchTrainer per trial running the real unlearning worker
and the full evaluation; ≥ 4 trials over 2 methods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train import expected_forget_quality, experiment, forget_truth_ratios

REPO = Path(__file__).resolve().parents[1]


def run_sweep(space: dict, name: str, tmp_path: Path, raysweep_cache: str, **env_extra: str) -> None:
    """``python -m raysweep.tune`` on ``space`` with the real worker, results and MLflow in ``tmp_path``."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAYSWEEP_CACHE=raysweep_cache, RAYSWEEP_OBJECT_STORE_MB="200", PYTHONUNBUFFERED="1",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", **env_extra)
    env.pop("RAYSWEEP_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "raysweep.tune", "--space", str(path), "--storage", str(tmp_path / "results"),
         "--name", name, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_on_the_embedded_model(embedded, embedded_specs, raysweep_cache, tmp_path):
    exp = experiment(embedded_specs, method="ME+GD", epochs=3)
    exp.eval.forget_quality = True
    space = {
        "experiment": exp.model_dump(mode="json"),
        "search": {
            "methods": ["ME+GD", "IDK+AP"],
            "space": {"lr": {"loguniform": [3e-4, 3e-3]}, "epochs": {"int": [2, 3]},
                      "beta": {"loguniform": [0.05, 0.5]}},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "num_samples": 4,
            "max_concurrent": 2,
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        },
        "tracking": {"experiment": "embedded-e2e"},
    }
    run_sweep(space, "e2e", tmp_path, raysweep_cache, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    exp_dir = tmp_path / "results" / "e2e"
    best = json.loads((exp_dir / "best.json").read_text())
    assert best["params"]["method"] in ("ME+GD", "IDK+AP")
    assert best["config"]["training"]["method"] == best["params"]["method"]
    assert 0 <= best["metrics"]["MU"] <= 1 and 0 <= best["metrics"]["FE"] <= 1
    trials = json.loads((exp_dir / "trials.json").read_text())
    assert len(trials) == 4
    assert {t["params"]["method"] for t in trials} == {"ME+GD", "IDK+AP"}
    for t in trials:
        assert t["status"] == "TERMINATED", t  # finished or stopped early by ASHA, none errored
        assert t["history"], t
        for row in t["history"]:
            for key in ("MU", "FE", "objective", "forget_quality"):
                assert 0 <= row[key] <= 1, (key, row)
            assert row["eval/ES_dropped"] == 1.0

    # MLflow: the parent run and one FINISHED child per trial, each with its generations tables.
    from raysweep.tracking import TAG_PARENT, TAG_TRIAL, client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("embedded-e2e").experiment_id])
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert {c.data.tags[TAG_TRIAL] for c in children} == {t["trial_id"] for t in trials}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "objective")]
        tables = [a.path for a in client.list_artifacts(child.info.run_id, "generations")]
        assert steps and f"generations/epoch_{steps[0]:03d}.json" in tables, (steps, tables)
        assert "forget/R" in child.data.metrics and "retain/R" in child.data.metrics
    local = client.download_artifacts(children[0].info.run_id, "generations/epoch_001.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert {"set", "question", "ground_truth", "generation", "R", "TR"} <= set(table["columns"])
    set_column = table["columns"].index("set")
    assert {"forget", "retain"} <= {row[set_column] for row in table["data"]}
    # Forget Quality at epoch 1 = KS p-value of the trial's forget-set truth ratios (its table)
    # against the retain model's, computed here from the retain model itself
    tr_column = table["columns"].index("TR")
    unlearned = [row[tr_column] for row in table["data"] if row[set_column] == "forget"]
    retain = forget_truth_ratios(exp, str(embedded.retain_dir))
    quality = [m for m in client.get_metric_history(children[0].info.run_id, "forget_quality") if m.step == 1]
    assert len(quality) == 1
    assert quality[0].value == pytest.approx(expected_forget_quality(unlearned, retain), rel=1e-6)
    assert (exp_dir / "report.md").is_file() and (exp_dir / "mu_fe.png").is_file()

    # best.yaml re-runs the best trial without Ray: on CPU at the same seed, the same metrics to 1e-6
    # at every epoch the trial reported (an early-stopped trial's rerun goes on past them)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSWEEP_", "RAY_ADDRESS"))}
    rerun = subprocess.run([sys.executable, "-m", "raysweep.unlearn", "--config", str(exp_dir / "best.yaml")],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**env, "RAYSWEEP_CACHE": raysweep_cache})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    epochs = {row["epoch"]: row for row in map(json.loads, (line for line in rerun.stdout.splitlines()
                                                             if line.startswith("{")))}
    recorded = next(t for t in trials if t["trial_id"] == best["trial_id"])["history"]
    for row in recorded:
        again = epochs[row["epoch"]]
        shared = [k for k, v in row.items() if isinstance(v, float) and k in again and k != "objective_best"
                  and not k.startswith(("time", "timestamp"))]
        assert {"objective", "MU", "FE", "forget_quality"} <= set(shared), shared
        for key in shared:
            assert again[key] == pytest.approx(row[key], abs=1e-6), (row["epoch"], key)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_continual_sweep_reports_and_logs_per_step(embedded, embedded_specs, raysweep_cache, tmp_path):
    """The continual scenario through Tune: one report per step (ASHA's time unit), MLflow
    metrics at step = 1, 2, 3, and the report's MU/FE-vs-step plot."""
    exp = experiment(embedded_specs, method="NPO+GD", epochs=1)
    exp.scenario = "continual"
    exp.data.task_ids = None
    exp.continual.steps = 3
    space = {
        "experiment": exp.model_dump(mode="json"),
        "search": {
            "methods": ["NPO+GD", "ME+GD"],
            "space": {"lr": {"loguniform": [3e-4, 3e-3]}, "epochs": 1, "beta": 0.1},
            "scheduler": {"type": "none"},
            "num_samples": 2,
            "max_concurrent": 2,
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        },
        "tracking": {"experiment": "continual-e2e", "log_generations": False},
    }
    run_sweep(space, "cont", tmp_path, raysweep_cache)
    exp_dir = tmp_path / "results" / "cont"
    trials = json.loads((exp_dir / "trials.json").read_text())
    assert {t["params"]["method"] for t in trials} == {"NPO+GD", "ME+GD"}
    for t in trials:
        assert t["status"] == "TERMINATED", t
        assert [row["step"] for row in t["history"]] == [1, 2, 3]
        sizes = [row["data/retain_size"] for row in t["history"]]
        assert sizes[0] > sizes[1] > sizes[2]
        assert t["history"][-1]["objective"] == pytest.approx(
            sum(row["objective_step"] for row in t["history"]) / 3)

    from raysweep.tracking import TAG_PARENT, client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("continual-e2e").experiment_id])
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    assert len(children) == 2
    for child in children:
        for key in ("MU", "FE", "objective_step"):
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, key)) == [1, 2, 3], key
    assert (exp_dir / "steps.png").is_file() and (exp_dir / "steps.png").stat().st_size > 5000
