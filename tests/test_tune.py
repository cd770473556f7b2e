"""Tests of ``raysweep.tune`` / ``raysweep.trial``: the search space, the CLI checks, and the Ray
mechanics (ASHA, divergence, resume, two nodes) with the fast fake worker of ``fake_worker.py``.

The Ray sweeps run ``python -m raysweep.tune`` as a subprocess with
``RAYSWEEP_WORKER=tests/fake_worker.py:run``, so they test the command as users run it without
needing the embedded model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from pydantic import ValidationError

import fake_worker

from raysweep.config import ConfigError, ExperimentConfig, SweepConfig, parse_config
from raysweep.trial import TrialDiverged, divergence_message, sampled_params, trial_experiment
from raysweep.config import ResourcesConfig
from raysweep.tune import SpaceBuilder, error_reason, main, pareto_front, results_table, trial_fits, uses_beta

REPO = Path(__file__).resolve().parent.parent
FAKE_WORKER = f"{Path(__file__).resolve().parent / 'fake_worker.py'}:run"
SWEEP_TIMEOUT = 400


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_of(data: dict) -> SweepConfig:
    return SweepConfig.model_validate(data)


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYSWEEP_", "RAY_ADDRESS"))}
    env.update(
        RAYSWEEP_WORKER=FAKE_WORKER,
        RAYSWEEP_FAKE_LOG=str(tmp_path / "fake_log.jsonl"),
        RAYSWEEP_OBJECT_STORE_MB="200",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",  # never ./mlflow.db of the repository
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        # Faster Train teardown and one actor less per trial on a 2-core CI machine.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
    )
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict, log: Path, timeout: float = SWEEP_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m raysweep.tune ARGS`` run from the log's (tmp) directory, never the checkout:
    whatever a sweep writes next to where it starts stays out of the repository."""
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "raysweep.tune", *args],
            cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
        )
    return proc


def fake_events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "fake_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


# ----------------------------------------------------------------------------- search space (no Ray)


SPACE = {
    "experiment": {"name": "unit", "training": {"lr": 2e-5, "epochs": 5, "lora": {"enabled": False}}},
    "search": {
        "methods": ["ME+GD", "GA+GD", "NPO+GD", "IDK+AP"],
        "space": {
            "lr": {"loguniform": [1e-6, 1e-5]},
            "epochs": {"int": [2, 4]},
            "forget_coeff": {"uniform": [0.2, 2.0]},
            "beta": {"choice": [0.05, 0.2, 0.5]},
            "reg_coeff": 1.0,
            "lora_r": {"choice": [0, 8]},
        },
        "overrides": {"GA+GD": {"lr": {"loguniform": [1e-7, 1e-6]}}},
    },
}


def test_uses_beta_only_for_npo_dpo_ap():
    assert [m for m in ("GA+GD", "GA+KL", "NPO+GD", "DPO+KL", "IDK+GD", "ME+GD", "IDK+AP", "ME+KL", "DPO+AP")
            if uses_beta(m)] == ["NPO+GD", "DPO+KL", "IDK+AP", "DPO+AP"]


def test_space_builder_namespaces_params_and_samples_beta_only_where_used():
    builder = SpaceBuilder(sweep_of(SPACE))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        config = builder(trial)
        method = config["method"]
        seen.add(method)
        names = set(trial.params) - {"method"}
        assert all(name.startswith(method + "/") for name in names), names
        assert ("beta" in config) == (method in ("NPO+GD", "IDK+AP"))
        assert (f"{method}/beta" in names) == ("beta" in config)
        low, high = (1e-7, 1e-6) if method == "GA+GD" else (1e-6, 1e-5)
        assert low <= config["lr"] <= high
        assert isinstance(config["epochs"], int) and 2 <= config["epochs"] <= 4
        assert config["reg_coeff"] == 1.0 and f"{method}/reg_coeff" not in names  # fixed, not searched
        assert config["lora_r"] in (0, 8)
        study.tell(trial, 0.5)
    assert seen == {"ME+GD", "GA+GD", "NPO+GD", "IDK+AP"}


def test_default_points_are_the_paper_defaults_clipped_and_enqueued_first():
    builder = SpaceBuilder(sweep_of(SPACE))
    points = builder.default_points()
    by_method = {p["method"]: p for p in points}
    # lr 2e-5 clipped into [1e-6, 1e-5]; into [1e-7, 1e-6] for GA+GD; epochs 5 -> 4.
    assert by_method["ME+GD"]["ME+GD/lr"] == 1e-5
    assert by_method["GA+GD"]["GA+GD/lr"] == 1e-6
    assert by_method["ME+GD"]["ME+GD/epochs"] == 4
    # alpha: 0.1 for ME+GD (paper, TOFU) clipped to the range's 0.2; 1.0 otherwise.
    assert by_method["ME+GD"]["ME+GD/forget_coeff"] == 0.2
    assert by_method["NPO+GD"]["NPO+GD/forget_coeff"] == 1.0
    # beta 0.1 -> nearest choice (log scale: 0.05 and 0.2 are equally near; either is fine).
    assert by_method["NPO+GD"]["NPO+GD/beta"] in (0.05, 0.2)
    assert "GA+GD/beta" not in by_method["GA+GD"]
    assert by_method["ME+GD"]["ME+GD/lora_r"] == 0  # LoRA disabled in training -> full fine-tuning

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    for point in points:
        trial = study.ask()
        config = builder(trial)
        method = point["method"]
        assert config["method"] == method
        assert config["lr"] == point[f"{method}/lr"]
        assert config["forget_coeff"] == point[f"{method}/forget_coeff"]
        study.tell(trial, 0.1)


def test_trial_experiment_lays_sampled_values_on_the_experiment():
    base = ExperimentConfig.model_validate({"training": {"lr": 1e-5, "lora": {"enabled": False, "r": 4}}})
    config = {"method": "NPO+GD", "NPO+GD": {"lr": 3e-6}, "lr": 3e-6, "epochs": 2, "beta": 0.3, "lora_r": 16}
    params = sampled_params(config)
    assert params == {"method": "NPO+GD", "lr": 3e-6, "epochs": 2, "beta": 0.3, "lora_r": 16}
    cfg = trial_experiment(base, params, "/tmp/somewhere")
    tr = cfg.training
    assert (tr.method, tr.lr, tr.epochs, tr.beta) == ("NPO+GD", 3e-6, 2, 0.3)
    assert tr.lora.enabled and tr.lora.r == 16 and str(tr.output_dir) == "/tmp/somewhere"
    assert not trial_experiment(base, {"lora_r": 0}).training.lora.enabled
    with pytest.raises(ValidationError, match="unknown unlearning method 'NOPE'"):
        trial_experiment(base, {"method": "NOPE"})


def test_divergence_is_found_anywhere_in_the_exception_chain():
    class DivergenceError(RuntimeError):
        pass

    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    inner = DivergenceError("loss became nan at epoch 2")
    outer = WorkerGroupError({0: inner, 1: RuntimeError("collateral")})
    assert divergence_message(outer) == "DivergenceError: loss became nan at epoch 2"
    try:
        try:
            raise inner
        except DivergenceError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as err:
        assert divergence_message(err) == "DivergenceError: loss became nan at epoch 2"
    assert divergence_message(RuntimeError("out of memory")) is None
    assert isinstance(TrialDiverged("x"), RuntimeError)


def test_error_reason_and_tables():
    text = 'Traceback (most recent call last):\n  File "x.py", line 1\nraysweep.trial.TrialDiverged: DivergenceError: loss became nan\n'
    assert error_reason(text) == "DivergenceError: loss became nan"
    assert error_reason("Traceback:\n  File 'a'\nValueError: bad thing\n") == "ValueError: bad thing"

    def summary(tid, mu, fe, status="TERMINATED"):
        metrics = {"epoch": 1, "MU": mu, "FE": fe, "objective": (mu + fe) / 2}
        return {"trial_id": tid, "status": status, "params": {"method": "GA+GD", "lr": 1e-5}, "best": metrics,
                "last": metrics, "error": None if status == "TERMINATED" else "DivergenceError: x",
                "early_stopped": False, "checkpoint": None}

    rows = [summary("a", 0.9, 0.05), summary("b", 0.5, 0.5), summary("c", 0.4, 0.4), summary("d", 1.0, 1.0, "ERROR")]
    assert [s["trial_id"] for s in pareto_front(rows)] == ["a", "b"]
    table = results_table(rows).splitlines()
    assert [line.split()[0] for line in table[2:]] == ["b", "a", "c", "d"]  # objective order, errors last
    assert "DivergenceError: x" in table[-1]


# ----------------------------------------------------------------------------- CLI checks (no Ray)


GOOD = {
    "experiment": {"name": "cli", "training": {"epochs": 2}},
    "search": {"methods": ["GA+GD"], "num_samples": 1},
}


def _exit_code(capsys, argv) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return info.value.code, err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("bad_yaml", "line"),
        ("unknown_set", "search.bogus: unknown key"),
        ("bad_value", "search.scheduler.grace_period"),
        ("resume_empty", "no experiment to resume"),
        ("gpu_missing", "search.resources.use_gpu"),
        ("storage_unwritable", "not writable"),
        ("too_many_cpus", "search.resources.cpus_per_worker"),
        ("too_many_gpus", "one trial needs 2 GPUs (num_workers x gpus_per_worker) but this machine has 1"),
        ("existing_experiment", "already holds an experiment: pass --resume"),
        ("worker_unloadable", "cannot load worker 'no_such_module_xyz:run'"),
        ("worker_no_function", "cannot load worker"),
    ],
)
def test_cli_errors_exit_2_with_one_line_and_no_ray(tmp_path, capsys, monkeypatch, case, expect):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A check that does not fire must fail the test at once, not build the embedded default or
    # start a sweep (and nothing may land in the checkout meanwhile).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr("raysweep.scenarios.ensure_embedded_for",
                        lambda *a, **k: pytest.fail("got past the checks (building the embedded default)"))
    monkeypatch.setattr("raysweep.tune.start_ray", lambda *a, **k: pytest.fail("got past the checks (starting Ray)"))
    space = write_yaml(tmp_path / "space.yaml", GOOD)
    argv = ["--space", str(space), "--storage", str(tmp_path / "results")]
    if case == "bad_yaml":
        space.write_text("search:\n  methods: [GA+GD\n")
    elif case == "unknown_set":
        argv += ["--set", "search.bogus=1"]
    elif case == "bad_value":
        argv += ["--set", "search.scheduler.grace_period=5"]  # > max_t = 2 epochs
    elif case == "resume_empty":
        (tmp_path / "results" / "nothing").mkdir(parents=True)
        argv += ["--name", "nothing", "--resume"]
    elif case == "gpu_missing":
        monkeypatch.setattr("raysweep.sweep.cluster._gpu_count", lambda: 0)
        argv += ["--set", "search.resources.use_gpu=true"]
    elif case == "storage_unwritable":
        (tmp_path / "file").write_text("not a directory")
        argv = ["--space", str(space), "--storage", str(tmp_path / "file" / "results")]
    elif case == "too_many_cpus":
        argv += ["--set", "search.resources.cpus_per_worker=4096"]
    elif case == "too_many_gpus":
        monkeypatch.setattr("raysweep.sweep.cluster._gpu_count", lambda: 1)
        argv += ["--set", "search.resources.use_gpu=true", "--set", "search.resources.num_workers=2"]
    elif case == "existing_experiment":
        existing = tmp_path / "results" / "done"
        existing.mkdir(parents=True)
        (existing / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
        argv += ["--name", "done"]
    elif case == "worker_unloadable":
        monkeypatch.setenv("RAYSWEEP_WORKER", "no_such_module_xyz:run")
    elif case == "worker_no_function":
        monkeypatch.setenv("RAYSWEEP_WORKER", f"{Path(__file__).resolve().parent / 'fake_worker.py'}:no_such_function")
    code, err = _exit_code(capsys, argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expect in err[0]
    if case == "too_many_gpus":
        assert "search.resources.num_workers" in err[0]
    if case == "existing_experiment":
        assert "--name" in err[0] and str(tmp_path / "results" / "done") in err[0]
    if case.startswith("worker_"):
        assert err[0].startswith("error: RAYSWEEP_WORKER: ")
    if case not in ("storage_unwritable", "resume_empty", "existing_experiment") and not case.startswith("worker_"):
        assert str(space) in err[0]
    assert not ray.is_initialized()


def test_cli_error_as_a_subprocess(tmp_path):
    space = write_yaml(tmp_path / "space.yaml", {"search": {"methods": ["GA+GD"], "nope": 1}})
    env = fake_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "raysweep.tune", "--space", str(space), "--storage", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {space}: search.nope: unknown key"]
    assert "Ray" not in proc.stdout


GRID = {
    "experiment": {"name": "grid", "training": {"lr": 1e-5, "epochs": 3, "forget_coeff": 0.3}},
    "search": {
        "algorithm": "grid",
        "methods": ["ME+GD", "NPO+GD"],
        "space": {"lr": {"choice": [1e-5, 2e-5, 4e-5]}, "epochs": {"choice": [3, 5]}, "beta": 0.1},
        "overrides": {"NPO+GD": {"lr": {"choice": [1e-6]}}},
        "scheduler": {"type": "none"},
    },
}


def test_grid_points_are_the_cartesian_product_per_method():
    builder = SpaceBuilder(sweep_of(GRID))
    points = builder.grid_points()
    me = [p for p in points if p["method"] == "ME+GD"]
    npo = [p for p in points if p["method"] == "NPO+GD"]
    assert sorted((p["lr"], p["epochs"]) for p in me) == sorted(
        (lr, e) for lr in (1e-5, 2e-5, 4e-5) for e in (3, 5))
    assert sorted((p["lr"], p["epochs"]) for p in npo) == [(1e-6, 3), (1e-6, 5)]
    assert all("beta" not in p and p["forget_coeff"] == 0.3 for p in me)  # ME+GD has no beta
    assert all(p["beta"] == 0.1 and isinstance(p["epochs"], int) for p in npo)
    assert len(points) == 8 and len({tuple(sorted(p.items())) for p in points}) == 8


@pytest.mark.parametrize("where, key", [("space", "search.space.lr"), ("override", "search.overrides.NPO+GD.lr")])
def test_grid_rejects_continuous_ranges_naming_the_key(where, key):
    data = json.loads(json.dumps(GRID))
    if where == "space":
        data["search"]["space"]["lr"] = {"loguniform": [1e-6, 1e-4]}
        data["search"]["overrides"] = {}
    else:
        data["search"]["overrides"]["NPO+GD"]["lr"] = {"uniform": [1e-6, 1e-5]}
    with pytest.raises(ConfigError) as err:
        parse_config(data, "grid.yaml")
    assert key in err.value.one_line() and "choice list" in err.value.one_line()


def test_trial_fits_counts_bundles_per_node_and_autoscaler_types():
    two_gpu = ResourcesConfig(num_workers=2, use_gpu=True, gpus_per_worker=1, cpus_per_worker=4)
    cpu_node, gpu_node = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}
    assert not trial_fits(two_gpu, [(cpu_node, 1), (cpu_node, 1)])  # no GPU anywhere
    assert not trial_fits(two_gpu, [(gpu_node, 1)])  # one bundle per node, two needed
    assert trial_fits(two_gpu, [(gpu_node, 1), (gpu_node, 1)])
    assert trial_fits(two_gpu, [({"CPU": 96.0, "GPU": 8.0}, 1)])  # both on one p4d
    p4d = ({"CPU": 96.0, "GPU": 8.0}, 0)
    assert not trial_fits(two_gpu, [(cpu_node, 1), p4d])  # an autoscaler type with max 0
    assert trial_fits(two_gpu, [(cpu_node, 1), (p4d[0], 2)]) and trial_fits(two_gpu, [(gpu_node, -1)])
    cpu_only = ResourcesConfig(num_workers=3, cpus_per_worker=2)
    assert trial_fits(cpu_only, [({"CPU": 4.0}, 1), ({"CPU": 2.0}, 1)])
    assert not trial_fits(cpu_only, [({"CPU": 4.0}, 1), ({"CPU": 1.0}, 3)])


# ----------------------------------------------------------------------------- cluster preflight (Ray faked)


class FakeCluster:
    """What ``start_ray(sweep, address)`` asks of Ray about a cluster, without one: its total
    resources, its live nodes, and the autoscaler's node types as the GCS stores them (a
    serialized ``autoscaler_pb2.ClusterConfig``, read by Ray's own ``get_cluster_config``)."""

    def __init__(self, monkeypatch, nodes: list[dict], node_types: list[tuple[str, dict, int]] | None):
        import ray
        # Without node types in the GCS the driver falls back to the head's cluster config file
        # (cluster.bootstrap_node_types); this machine has none.
        monkeypatch.setenv("RAYSWEEP_AUTOSCALING_CONFIG", "/nonexistent/ray_bootstrap_config.yaml")
        from ray._private.state import state
        from ray.core.generated import autoscaler_pb2

        self.calls: list[str] = []
        total: dict[str, float] = {}
        for node in nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        config = None
        if node_types is not None:
            config = autoscaler_pb2.ClusterConfig()
            for name, resources, max_count in node_types:
                group = config.node_group_configs.add()
                group.name, group.max_count = name, max_count
                for key, value in resources.items():
                    group.resources[key] = int(value)  # a uint64 map in the proto
        blob = config.SerializeToString() if config is not None else None

        class Accessor:
            def get_internal_kv(self, namespace, key):
                return blob if key == ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode() else None

        monkeypatch.setattr(ray, "init", lambda *a, **k: self.calls.append("init"))
        monkeypatch.setattr(ray, "shutdown", lambda *a, **k: self.calls.append("shutdown"))
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": dict(n)} for n in nodes])
        monkeypatch.setattr(state, "_connect_and_get_accessor", lambda: Accessor())


def _cluster_sweep(**resources) -> SweepConfig:
    return sweep_of({"search": {"methods": ["ME+GD"], "max_concurrent": 2, "resources": resources}})


def test_autoscaler_node_type_probe_reads_the_cluster_config(monkeypatch):
    from raysweep.sweep.cluster import _autoscaler_node_types

    FakeCluster(monkeypatch, [{"CPU": 8.0}], [("head", {"CPU": 8.0}, 1), ("p4d", {"CPU": 96.0, "GPU": 8.0}, 4)])
    types = sorted(_autoscaler_node_types(), key=lambda t: t[1])
    assert types == [({"CPU": 8.0}, 1), ({"CPU": 96.0, "GPU": 8.0}, 4)]
    FakeCluster(monkeypatch, [{"CPU": 8.0}], None)  # no autoscaler: only live nodes count
    assert _autoscaler_node_types() == []


def test_gpu_trial_waits_for_a_node_type_the_autoscaler_can_launch(monkeypatch, capsys):
    from raysweep.tune import start_ray

    fake = FakeCluster(monkeypatch, [{"CPU": 8.0, "trial_driver": 2.0}], [("p4d", {"CPU": 96.0, "GPU": 8.0}, 2)])
    start_ray(_cluster_sweep(use_gpu=True, num_workers=2, cpus_per_worker=4), "ray://head:10001")
    assert fake.calls == ["init"]  # joined, not shut down
    assert "trials wait until the autoscaler adds such nodes" in capsys.readouterr().err


@pytest.mark.parametrize("max_count", [0, None])
def test_gpu_trial_no_node_type_can_hold_exits_2_with_the_shapes(monkeypatch, capsys, max_count):
    """A p4d type with max 0 (or no autoscaler at all): Ray would wait forever; exit 2 instead."""
    from raysweep.tune import start_ray

    types = None if max_count is None else [("p4d", {"CPU": 96.0, "GPU": 8.0}, max_count)]
    fake = FakeCluster(monkeypatch, [{"CPU": 8.0, "trial_driver": 2.0}], types)
    with pytest.raises(SystemExit) as info:
        start_ray(_cluster_sweep(use_gpu=True, num_workers=2, cpus_per_worker=4), "ray://head:10001")
    assert info.value.code == 2 and fake.calls == ["init", "shutdown"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --address: ") and "can never provide" in err[0], err
    assert "{CPU: 4, GPU: 1}" in err[0]  # what one worker needs
    assert "{CPU: 8}" in err[0] and ("{CPU: 96, GPU: 8}" in err[0]) == (max_count is not None)


def test_cluster_without_the_trial_driver_resource_exits_2(monkeypatch, capsys):
    from raysweep.tune import start_ray

    fake = FakeCluster(monkeypatch, [{"CPU": 8.0}, {"CPU": 8.0}], None)
    with pytest.raises(SystemExit) as info:
        start_ray(_cluster_sweep(), "ray://head:10001")
    assert info.value.code == 2 and fake.calls == ["init", "shutdown"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --address: "), err
    assert "has no 'trial_driver' resource" in err[0] and "ray start --resources" in err[0]


def test_cluster_without_the_trial_driver_resource_exits_2_from_the_cli(tmp_path, monkeypatch, capsys):
    """Through ``main``: validated, preflighted, then refused at the cluster; no MLflow run."""
    FakeCluster(monkeypatch, [{"CPU": 8.0}], None)
    monkeypatch.setenv("RAYSWEEP_WORKER", FAKE_WORKER)  # no embedded build
    space = write_yaml(tmp_path / "space.yaml", GOOD)
    code, err = _exit_code(capsys, ["--space", str(space), "--storage", str(tmp_path / "results"), "--address",
                                    "ray://head:10001", "--set", "tracking.enabled=false"])
    assert code == 2 and len(err) == 1 and "has no 'trial_driver' resource" in err[0], err


# ----------------------------------------------------------------------------- Ray sweeps (fake worker)


E2E = {
    "experiment": {"name": "e2e", "training": {"lr": 1e-5, "epochs": 3, "save_checkpoint": "best"}},
    "search": {
        "methods": ["NPO+GD", "GA+GD"],
        "space": {
            "lr": {"loguniform": [1e-6, 1e-4]},
            "epochs": 3,
            "forget_coeff": {"uniform": [0.05, 1.0]},
            "beta": {"loguniform": [0.05, 0.5]},
        },
        "num_samples": 4,
        "max_concurrent": 1,  # one trial at a time: ASHA sees results in start order, so its stops are computable
        "seed": 3,
        # Ray's own ASHA (no guard), replayed by expected_asha_stops; the guards: test_search_guards_through_tune
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "keep_best_per_method": False},
    },
}


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's milestones: grace_period x rf^k below max_t (grace 1, rf 2, max_t 3: epochs 1, 2)."""
    rungs, t = [], grace_period
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs


def expected_asha_stops(trials: list[dict], rungs: list[int], reduction_factor: float,
                        diverge_at: dict[str, int]) -> dict[str, int | None]:
    """Replays asynchronous successive halving over ``trials`` (in the order they ran, one at a
    time) on the fake worker's known curves: at each rung a trial is stopped when its objective is
    below the (1 - 1/rf) quantile of the objectives earlier trials had there; the first trial at a
    rung always continues. Returns the epoch each trial is stopped at (None: not stopped).
    ``diverge_at``: trial id -> the epoch whose report never comes (DivergenceError)."""
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    stops: dict[str, int | None] = {}
    for t in trials:
        p = t["params"]
        stops[t["trial_id"]] = None
        for epoch in range(1, min(p["epochs"], diverge_at.get(t["trial_id"], 10**6) - 1) + 1):
            if epoch not in recorded:
                continue
            value = fake_worker.objective(p["lr"], p["forget_coeff"], epoch)
            earlier = list(recorded[epoch])
            recorded[epoch].append(value)
            if earlier and value < np.percentile(earlier, (1 - 1 / reduction_factor) * 100):
                stops[t["trial_id"]] = epoch
                break
    return stops


@pytest.fixture(scope="module")
def e2e_sweep(tmp_path_factory):
    """One sweep, 4 trials over NPO+GD and GA+GD with ASHA; GA+GD's default (lr 1e-5) diverges."""
    tmp = tmp_path_factory.mktemp("e2e")
    space = write_yaml(tmp / "space.yaml", E2E)
    env = fake_env(tmp, RAYSWEEP_FAKE_DIVERGE_LR="1e-5", RAYSWEEP_FAKE_DIVERGE_METHOD="GA+GD",
                   RAYSWEEP_FAKE_SLEEP="0.5")
    log = tmp / "driver.log"
    started = time.time()
    # MLflow tracking is covered by tests/test_tracking.py; no generation tables here (faster).
    proc = run_cli(["--space", str(space), "--storage", str(tmp / "results"), "--name", "sweep",
                    "--set", "tracking.log_generations=false"], env, log)
    return {"tmp": tmp, "proc": proc, "log": log, "path": tmp / "results" / "sweep", "seconds": time.time() - started}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_end_to_end(e2e_sweep):
    path, log = e2e_sweep["path"], e2e_sweep["log"]
    assert e2e_sweep["proc"].returncode == 0, tail(log)
    out = log.read_text()
    # The console's trial lines name our parameters; the final table is sorted by objective.
    assert " started: NPO+GD lr=" in out and "α=" in out and "objective" in out
    assert "Results (sorted by objective" in out

    trials = json.loads((path / "trials.json").read_text())  # in start order
    assert len(trials) == 4
    assert {t["params"]["method"] for t in trials} == {"NPO+GD", "GA+GD"}
    ok = [t for t in trials if t["status"] == "TERMINATED"]
    assert len(ok) == 3 and all(t["status"] in ("TERMINATED", "ERROR") for t in trials)
    # The paper defaults were enqueued first, in the order of search.methods.
    default = {"lr": 1e-5, "epochs": 3, "forget_coeff": 1.0, "reg_coeff": 1.0}
    assert trials[0]["params"] == {"method": "NPO+GD", **default, "beta": 0.1}
    assert trials[1]["params"] == {"method": "GA+GD", **default}

    # Every reported value is the fake worker's known curve of that config, untouched by Ray.
    for t in trials:
        p = t["params"]
        assert [row["epoch"] for row in t["history"]] == list(range(1, len(t["history"]) + 1))
        for row in t["history"]:
            mu, fe = fake_worker.scores(p["lr"], p["forget_coeff"], row["epoch"])
            assert (row["MU"], row["FE"]) == (pytest.approx(mu, rel=1e-12), pytest.approx(fe, rel=1e-12))
            assert row["objective"] == pytest.approx(fake_worker.objective(p["lr"], p["forget_coeff"], row["epoch"]),
                                                     rel=1e-12)

    # ASHA (grace 1, rf 2, max_t 3 epochs) stopped exactly the trials it should have, where it should have.
    sched = E2E["search"]["scheduler"]
    rungs = asha_rungs(sched["grace_period"], sched["reduction_factor"], E2E["search"]["space"]["epochs"])
    assert rungs == [1, 2]
    diverged = {t["trial_id"]: 2 for t in trials if t["status"] == "ERROR"}
    expected = expected_asha_stops(trials, rungs, sched["reduction_factor"], diverged)
    assert sum(e is not None for e in expected.values()) >= 1, ("the sweep must exercise a stop", expected)
    assert sum(e is None and t["status"] == "TERMINATED" for t, e in zip(trials, expected.values())) >= 1
    for t in trials:
        stop = expected[t["trial_id"]]
        assert t["early_stopped"] == (stop is not None), (t["trial_id"], t["params"], stop, t["history"])
        if t["status"] == "TERMINATED":
            assert t["last"]["epoch"] == (stop if stop is not None else 3), (t["trial_id"], stop)

    # beta is never sampled for GA: absent from the Tune config of every GA trial.
    for trial_dir in path.glob("run_trial_*"):
        config = json.loads((trial_dir / "params.json").read_text())
        if config["method"] == "GA+GD":
            assert "beta" not in config and "beta" not in config.get("GA+GD", {})
        else:
            assert 0.05 <= config["beta"] <= 0.5

    best = json.loads((path / "best.json").read_text())
    cfg = ExperimentConfig.model_validate(best["config"])
    assert cfg.training.method == best["params"]["method"] and cfg.training.lr == best["params"]["lr"]
    assert best["status"] == "TERMINATED"
    # the best trial and epoch, recomputed from the known curves over the epochs each trial ran
    best_expected = max(((fake_worker.objective(t["params"]["lr"], t["params"]["forget_coeff"], e), -e, t["trial_id"])
                         for t in ok for e in range(1, t["last"]["epoch"] + 1)))
    assert (best["trial_id"], best["best_epoch"]) == (best_expected[2], -best_expected[1])
    m = best["metrics"]
    assert m["objective"] == pytest.approx(best_expected[0], rel=1e-12) and m["epoch"] == best["best_epoch"]
    assert best["checkpoint"] and json.loads((Path(best["checkpoint"]) / "model.json").read_text())["lr"] == best["params"]["lr"]
    assert best["trials"] == {"total": 4, "finished": 3, "errored": 1,
                              "early_stopped": sum(e is not None for e in expected.values())}
    print(f"e2e sweep: {e2e_sweep['seconds']:.0f} s; ASHA stops: {expected}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_divergent_trial_is_errored_and_sweep_goes_on(e2e_sweep):
    path = e2e_sweep["path"]
    assert e2e_sweep["proc"].returncode == 0, tail(e2e_sweep["log"])
    trials = json.loads((path / "trials.json").read_text())
    errored = [t for t in trials if t["status"] == "ERROR"]
    assert len(errored) == 1
    bad = errored[0]
    assert bad["params"]["method"] == "GA+GD" and bad["params"]["lr"] == 1e-5
    assert bad["error"].startswith("DivergenceError: loss became nan at epoch 2")
    assert (Path(bad["path"]) / "diverged.txt").read_text().startswith("DivergenceError")
    assert "DivergenceError" in e2e_sweep["log"].read_text()
    assert (path / "best.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grid_sweep_runs_every_point_once_without_mlflow(tmp_path):
    data = json.loads(json.dumps(GRID))
    data["search"].update(num_samples=1, max_concurrent=2)  # num_samples is ignored by a grid
    data["search"]["space"]["epochs"] = {"choice": [2]}
    data["search"]["space"]["lr"] = {"choice": [1e-5, 2e-5]}
    space = write_yaml(tmp_path / "grid.yaml", data)
    log = tmp_path / "driver.log"
    # also: tracking.enabled=false leaves no MLflow store behind (fake_env points MLflow at tmp_path)
    proc = run_cli(["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "grid",
                    "--set", "tracking.enabled=false"], fake_env(tmp_path), log)
    assert proc.returncode == 0, tail(log)
    assert not (tmp_path / "mlflow.db").exists() and "MLflow: off" in log.read_text()
    trials = json.loads((tmp_path / "results" / "grid" / "trials.json").read_text())
    got = sorted((t["params"]["method"], t["params"]["lr"], t["params"]["epochs"]) for t in trials)
    assert got == [("ME+GD", 1e-5, 2), ("ME+GD", 2e-5, 2), ("NPO+GD", 1e-6, 2)]  # 2 x 1 + 1 x 1 points
    assert all(t["status"] == "TERMINATED" and len(t["history"]) == 2 for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_sigkill_runs_every_trial_once(tmp_path):
    data = {
        "experiment": {"name": "resume", "training": {"lr": 1e-5, "epochs": 2}},
        "search": {"methods": ["ME+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
                   "num_samples": 3, "max_concurrent": 1, "scheduler": {"type": "none"}},
    }
    space = write_yaml(tmp_path / "space.yaml", data)
    env = fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="1.0", TUNE_GLOBAL_CHECKPOINT_S="1")
    args = ["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "exp"]
    path = tmp_path / "results" / "exp"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "raysweep.tune", *args], cwd=tmp_path, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            states = list(path.glob("experiment_state-*.json"))
            if states and "TERMINATED" in states[0].read_text(errors="replace"):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before it could be killed:\n" + tail(tmp_path / "first.log")
        assert time.time() < deadline, "no trial finished in time:\n" + tail(tmp_path / "first.log")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and everything in its session
        first.wait()
        log.close()
    done_before = [e["trial"] for e in fake_events(tmp_path) if e["event"] == "done"]
    assert len(done_before) >= 1

    proc = run_cli([*args, "--resume"], env, tmp_path / "second.log")
    assert proc.returncode == 0, tail(tmp_path / "second.log")
    trials = json.loads((path / "trials.json").read_text())
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" for t in trials)
    events = fake_events(tmp_path)
    done = [e["trial"] for e in events if e["event"] == "done"]
    assert sorted(set(done)) == sorted(done) and len(done) == 3, done  # every trial finished exactly once
    for trial in done_before:  # a trial finished before the kill was not started again
        assert sum(e["event"] == "start" and e["trial"] == trial for e in events) == 1
    assert (path / "best.json").is_file()

    # MLflow: the same parent run, one child per trial (no duplicate), none left RUNNING, one
    # point per epoch also for the trial the kill interrupted (it ran again from epoch 1).
    from raysweep.tracking import TAG_PARENT, TAG_TRIAL, client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert json.loads((path / "mlflow.json").read_text())["parent_run_id"] == parents[0].info.run_id
    assert sorted(c.data.tags[TAG_TRIAL] for c in children) == sorted(t["trial_id"] for t in trials)
    assert all(c.data.tags[TAG_PARENT] == parents[0].info.run_id for c in children)
    assert [r.info.status for r in runs if r.info.status != "FINISHED"] == []
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "objective")] == [1, 2]
        tables = sorted(a.path for a in client.list_artifacts(child.info.run_id, "generations"))
        assert tables == ["generations/epoch_001.json", "generations/epoch_002.json"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_cluster_places_trials_on_both_nodes(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    data = {
        "experiment": {"name": "cluster", "training": {"lr": 1e-5, "epochs": 2}},
        "search": {"methods": ["ME+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
                   "num_samples": 2, "max_concurrent": 2, "objective": "pareto", "scheduler": {"type": "none"}},
    }
    space = write_yaml(tmp_path / "space.yaml", data)
    env = fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="2.0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.setenv(key, env[key])  # the cluster's raylets start the trial drivers
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"trial_driver": 1}, "object_store_memory": 100 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, resources={"trial_driver": 1}, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        log = tmp_path / "driver.log"
        proc = run_cli(["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "exp",
                        "--address", cluster.address], env, log)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, tail(log)
    starts = [e for e in fake_events(tmp_path) if e["event"] == "start"]
    assert len(starts) == 2
    assert len({e["node"] for e in starts}) == 2, starts  # one trial's worker on each node
    best = json.loads((tmp_path / "results" / "exp" / "best.json").read_text())
    assert best["objective"] == "pareto"
    # The exact front, from the known curves at each trial's last epoch: (MU, FE) not dominated.
    trials = json.loads((tmp_path / "results" / "exp" / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["TERMINATED", "TERMINATED"]
    points = {t["trial_id"]: fake_worker.scores(t["params"]["lr"], t["params"]["forget_coeff"], 2) for t in trials}

    def dominated(p):
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    front = sorted((tid for tid, p in points.items() if not dominated(p)), key=lambda tid: -points[tid][0])
    assert [p["trial_id"] for p in best["pareto_front"]] == front
    for p in best["pareto_front"]:
        assert (p["MU"], p["FE"]) == (pytest.approx(points[p["trial_id"]][0]), pytest.approx(points[p["trial_id"]][1]))
    assert "Started a local Ray instance" not in log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_trial_on_a_cpu_cluster_without_autoscaler_exits_2(tmp_path, monkeypatch):
    """Ray would wait forever for GPUs no node has and no autoscaler can add: fail instead."""
    from ray.cluster_utils import Cluster

    data = {"search": {"methods": ["ME+GD"], "resources": {"use_gpu": True, "num_workers": 2}}}
    space = write_yaml(tmp_path / "space.yaml", data)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"trial_driver": 1}, "object_store_memory": 100 * 1024 * 1024})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "raysweep.tune", "--space", str(space), "--storage", str(tmp_path / "results"),
             "--address", cluster.address], cwd=tmp_path, env=fake_env(tmp_path), capture_output=True, text=True,
            timeout=180)
    finally:
        cluster.shutdown()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--address" in lines[0] and "can never provide" in lines[0], proc.stderr[-2000:]
    assert "GPU: 1" in lines[0]
