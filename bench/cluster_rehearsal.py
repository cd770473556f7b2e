"""Rehearse `ray up cluster.yaml` + the sweep on this machine, with Ray's fake multi-node autoscaler.

    python bench/cluster_rehearsal.py [--space search_spaces/tiny.yaml] [--out DIR]

1. Starts a head from ``cluster-local.yaml`` (cluster.yaml's node types in miniature: a head with
   ``trial_driver`` and CPU 0, an autoscaled CPU worker type standing in for the A100 type) with
   ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` on free ports, its own temp
   dir, and a marker variable in the environment of every process it starts.
2. Runs ``python -m raysweep.tune --space SPACE --address auto --num-samples 2 --max-concurrent 2``
   against it (``RAY_ADDRESS`` names this head, so ``auto`` cannot pick another Ray on the machine).
3. Reports what happened: which nodes the autoscaler added, on which node each trial's Train
   workers ran (Ray's state API: the ``RayTrainWorker`` actors), the MLflow runs it recorded.
4. Tears down by killing exactly the processes carrying its marker (never ``ray stop``, which
   would stop every Ray instance of the machine), then checks none is left.

Prints one JSON summary (also written to ``DIR/rehearsal.json``). With ``RAYSWEEP_WORKER`` set
(the tests' fake worker) the trials are fake; without it the real tiny.yaml trials run (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MARKER = "RAYSWEEP_REHEARSAL_ID"
HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER=marker`` (ours, and only ours)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def teardown(marker: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM then SIGKILL every marked process; returns the pids still alive (should be [])."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = marked_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and marked_pids(marker):
            time.sleep(0.5)
    return marked_pids(marker)


class LocalCluster:
    """A fake multi-node Ray cluster from cluster-local.yaml, started and stopped by us only."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, config: Path = REPO / "cluster-local.yaml"):
        self.workdir = workdir
        self.marker = uuid.uuid4().hex
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        raw = yaml.safe_load(config.read_text())
        raw["provider"]["gcs_address"] = self.address
        self.config = raw
        self.config_path = workdir / "cluster-local.json"
        self.config_path.write_text(json.dumps(raw))
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp"))  # short: socket paths
        head = raw["available_node_types"][raw["head_node_type"]]["resources"]
        self.head_resources = {k: v for k, v in head.items() if k != "CPU"}
        self.env = dict(os.environ if env is None else env)
        self.env.update({
            MARKER: self.marker,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_ADDRESS": self.address,  # `--address auto` means this head, not another Ray here
            # Ray Train's controller asks the state API; pin it to this cluster's dashboard.
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # `ray start --head` turns token authentication on by default; one machine, one user:
            # off, for the head and every process that connects (as Ray's cluster_utils does).
            "RAY_AUTH_MODE": "disabled",
            # The driver reads the autoscaler's node types from here (on a `ray up` head:
            # ~/ray_bootstrap_config.yaml; raysweep.sweep.plan.bootstrap_node_types).
            "RAYSWEEP_AUTOSCALING_CONFIG": str(self.config_path),
            "PYTHONPATH": os.pathsep.join([str(REPO), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        })

    def start(self) -> None:
        cmd = ["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.config['available_node_types'][self.config['head_node_type']]['resources'].get('CPU', 0)}",
               f"--resources={json.dumps(self.head_resources)}", f"--autoscaling-config={self.config_path}",
               f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               "--object-store-memory=100000000", "--disable-usage-stats"]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True, timeout=180)

    def nodes(self) -> list[dict]:
        """Every node the GCS has seen (alive or not), from a short-lived driver process."""
        code = ("import json, ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n.get('Resources', {})} "
                "for n in ray.nodes()]))") % self.address
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def train_worker_nodes(self) -> list[str]:
        """Node ids of every RayTrainWorker actor the cluster ran (Ray's state API)."""
        code = ("import json, ray; from ray.util.state import list_actors; "
                "ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([a.node_id for a in list_actors(filters=[('class_name', '=', 'RayTrainWorker')], "
                "limit=1000, detail=True, raise_on_missing_output=False)]))") % self.address
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def stop(self) -> list[int]:
        left = teardown(self.marker)
        return left


def mlflow_runs(uri: str, experiment: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [{"run_id": r.info.run_id, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
             "metrics": sorted(r.data.metrics)} for r in client.search_runs([exp.experiment_id])]


def rehearse(space: str, out: Path, env: dict[str, str] | None = None, extra: list[str] | None = None,
             timeout_s: float = 1500) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(out, env)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cluster.env["MLFLOW_TRACKING_URI"] = uri
    summary: dict = {"space": space, "address": cluster.address, "marker": cluster.marker}
    started = time.time()
    try:
        cluster.start()
        summary["nodes_at_start"] = len([n for n in cluster.nodes() if n["alive"]])
        cmd = [sys.executable, "-m", "raysweep.tune", "--space", space, "--address", "auto", "--num-samples", "2",
               "--max-concurrent", "2", "--storage", str(out / "results"), "--name", "rehearsal", *(extra or [])]
        with open(out / "sweep.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        summary["sweep_exit"] = proc.returncode
        summary["sweep_s"] = round(time.time() - started, 1)
        nodes = cluster.nodes()
        summary["nodes_seen"] = [{"id": n["id"][-5:], "alive": n["alive"], "CPU": n["resources"].get("CPU"),
                                  "trial_driver": n["resources"].get("trial_driver")} for n in nodes]
        summary["worker_nodes_added"] = len([n for n in nodes if n["id"] != HEAD_NODE_ID])
        summary["train_worker_nodes"] = sorted(node[-5:] for node in cluster.train_worker_nodes())
        experiment = yaml.safe_load((REPO / space).read_text() if not Path(space).is_absolute()
                                    else Path(space).read_text()).get("tracking", {}).get("experiment", "raysweep")
        summary["mlflow_runs"] = mlflow_runs(uri, experiment)
        trials = json.loads((out / "results" / "rehearsal" / "trials.json").read_text()) \
            if (out / "results" / "rehearsal" / "trials.json").is_file() else []
        summary["trials"] = [{"trial_id": t["trial_id"], "status": t["status"], "method": t["params"].get("method"),
                              "epochs_reported": len(t.get("history") or [])} for t in trials]
    finally:
        summary["processes_left_after_teardown"] = cluster.stop()
        summary["total_s"] = round(time.time() - started, 1)
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/tiny.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="raysweep-rehearsal-"))
    summary = rehearse(args.space, out)
    print(json.dumps(summary, indent=2))
    ok = (summary.get("sweep_exit") == 0 and summary.get("worker_nodes_added", 0) >= 1
          and not summary["processes_left_after_teardown"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
