"""The machine or cluster a sweep runs on: the checks before Ray starts (:func:`preflight`),
Ray start-up with the ``trial_driver`` resource (:func:`start_ray`) and whether one trial's
workers fit on the nodes and autoscaler node types (:func:`trial_fits`)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
from pathlib import Path

from raysweep.config import SweepConfig, fail
from raysweep.sweep.storage import is_remote

TRIAL_DRIVER = "trial_driver"
DEFAULT_STORAGE = "ray_results"


def worker_resources(cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float) -> dict[str, float]:
    """One Train worker's ``resources_per_worker`` (also what the cluster check fits on nodes)."""
    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(gpus_per_worker)
    return resources


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def writable(directory: Path, what: str = "storage directory", create: bool = True) -> str | None:
    """None if ``directory`` can be (created and) written, else why not, naming it as ``what``."""
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".raysweep-write-test-"):
            pass
    except OSError as err:
        return f"{what} {str(directory)!r} is not writable ({err.strerror or err})"
    return None


def _can_restore(path: str) -> bool:
    from ray.tune import Tuner

    try:
        return Tuner.can_restore(path)
    except Exception:  # noqa: BLE001 - unreadable or odd path: nothing to restore
        return False


def resolve_storage(flag: str | None, configured: str | None, space_file: str) -> str:
    """The results root: ``--storage`` > ``search.storage_path`` > ``./ray_results``; a local one
    made absolute and checked writable (exit 2 naming the flag or key otherwise)."""
    if flag:
        storage_raw, storage_key, storage_file = str(flag), "", "--storage"
    elif configured is not None:
        storage_raw, storage_key, storage_file = str(configured), "search.storage_path", space_file
    else:
        storage_raw, storage_key, storage_file = DEFAULT_STORAGE, "", "--storage"
    if is_remote(storage_raw):
        storage = storage_raw.rstrip("/")
    else:
        storage = str(Path(storage_raw).expanduser().resolve())
        why = writable(Path(storage))
        if why:
            fail(storage_file, storage_key, why)
    return storage


def preflight(args: argparse.Namespace, sweep: SweepConfig) -> tuple[str, str, str | None]:
    """Machine-dependent checks before Ray starts; returns ``(storage, name, address)``.

    Exits 2 (one line on stderr) when the storage is not writable, ``--resume`` finds no
    experiment, a new sweep would overwrite one, GPUs are requested but absent, or one trial's
    workers can never fit on this machine.
    """
    space_file = args.space
    search = sweep.search
    address = args.address or os.environ.get("RAY_ADDRESS") or None

    storage = resolve_storage(args.storage, search.storage_path, space_file)

    name = args.name
    if args.resume:
        if name is None:
            name = _latest_experiment(storage, sweep.experiment.name)
            if name is None:
                fail("--resume", "", f"no experiment named {sweep.experiment.name}-* to resume in {storage}")
        path = f"{storage}/{name}"
        if not _can_restore(path):
            fail("--resume", "", f"no experiment to resume in {path}")
    else:
        if name is None:
            name = f"{sweep.experiment.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path = f"{storage}/{name}"
        if _can_restore(path):
            fail("--name", "", f"{path} already holds an experiment: pass --resume to continue it or choose another --name")

    res = search.resources
    if address is None:
        if res.use_gpu:
            gpus = _gpu_count()
            need = res.num_workers * res.gpus_per_worker
            if gpus == 0:
                fail(space_file, "search.resources.use_gpu",
                     "true, but this machine has no GPU (give --address of a cluster with GPUs, or set it false)")
            if need > gpus:
                fail(space_file, "search.resources.num_workers",
                     f"one trial needs {need:g} GPUs (num_workers x gpus_per_worker) but this machine has {gpus}")
        cpus = int(os.environ.get("RAYSWEEP_NUM_CPUS") or _cpu_count())
        need_cpus = res.num_workers * res.cpus_per_worker
        if need_cpus > cpus:
            fail(space_file, "search.resources.cpus_per_worker",
                 f"one trial needs {need_cpus:g} CPUs (num_workers x cpus_per_worker) but this machine has {cpus}")
    return storage, name, address


def _latest_experiment(storage: str, prefix: str) -> str | None:
    if is_remote(storage):
        return None
    candidates = [p for p in Path(storage).glob(f"{prefix}-*") if p.is_dir() and _can_restore(str(p))]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime).name


def start_ray(sweep: SweepConfig, address: str | None) -> None:
    """Start local Ray with the trial-driver resource, or join the cluster at ``address``."""
    import ray

    k = sweep.search.max_concurrent
    if address:
        ray.init(address=address)
        have = ray.cluster_resources().get(TRIAL_DRIVER, 0)
        if have < 1:
            ray.shutdown()
            fail("--address", "",
                 f"the cluster at {address} has no {TRIAL_DRIVER!r} resource: start its nodes with "
                 f"ray start --resources='{{\"{TRIAL_DRIVER}\": {k}}}' (trials run one driver each)")
        if have < k:
            print(f"note: the cluster has {have:g} {TRIAL_DRIVER} slots; at most that many trials run at once",
                  file=sys.stderr)
        # Ray waits silently forever on a request no node can ever satisfy: check one trial's
        # workers against the nodes there are and the node types the autoscaler may add.
        res = sweep.search.resources
        now = [(dict(n.get("Resources") or {}), 1) for n in ray.nodes() if n.get("Alive")]
        later = _autoscaler_node_types()
        if not trial_fits(res, now + later):
            ray.shutdown()
            shapes = ", ".join(sorted({_shape(r) for r, _ in now + later})) or "none"
            fail("--address", "",
                 f"one trial needs {res.num_workers} worker(s) of {_shape(worker_bundle(res))} and the cluster at "
                 f"{address} can never provide them (nodes and autoscaler node types: {shapes}); "
                 "change search.resources or the cluster")
        if not trial_fits(res, now):
            print(f"note: one trial needs {res.num_workers} worker(s) of {_shape(worker_bundle(res))}; "
                  "trials wait until the autoscaler adds such nodes", file=sys.stderr)
        return
    # Workers import raysweep too: make it importable from wherever Ray starts them.
    root = str(Path(__file__).resolve().parents[2])  # the directory holding raysweep/
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    num_cpus = os.environ.get("RAYSWEEP_NUM_CPUS")
    object_store_mb = int(os.environ.get("RAYSWEEP_OBJECT_STORE_MB", "256"))
    # As many trial drivers as trials fit at once: a driver whose workers cannot get their CPUs
    # or GPUs would otherwise sit in a Train start-up timeout/retry loop instead of a Tune queue.
    res = sweep.search.resources
    fit = int((int(num_cpus) if num_cpus else _cpu_count()) // (res.num_workers * res.cpus_per_worker))
    if res.use_gpu and res.gpus_per_worker > 0:
        fit = min(fit, int(_gpu_count() // (res.num_workers * res.gpus_per_worker)))
    if max(1, fit) < k:
        print(f"note: {max(1, fit)} trial(s) fit on this machine at once (search.resources); "
              f"running {max(1, fit)} instead of max_concurrent={k}", file=sys.stderr)
        k = max(1, fit)
    # NB: keep the dashboard (Ray's default with ray[default]): with include_dashboard=False,
    # trials stopped by ASHA never released their Train workers in our measurements.
    # Ray Train's controller queries the state API without an address; with another local Ray
    # instance on the machine it would auto-detect *that* one ("Found multiple active Ray
    # instances") and trials would hang. Pin it to this instance's dashboard: the variable is
    # inherited by the raylet and so by every Ray worker it starts.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # One machine cannot be preempted: no PreemptionWatcher actor per trial (fewer processes).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",
        num_cpus=int(num_cpus) if num_cpus else None,
        resources={TRIAL_DRIVER: k},
        object_store_memory=object_store_mb * 1024 * 1024,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
    )


def worker_bundle(res) -> dict[str, float]:
    """One Train worker's resources under ``search.resources`` (as the trial requests them)."""
    return worker_resources(res.cpus_per_worker, res.use_gpu, res.gpus_per_worker)


def trial_fits(res, nodes: list[tuple[dict[str, float], int]]) -> bool:
    """Whether ``num_workers`` worker bundles fit on ``nodes`` — ``(resources, count)`` pairs,
    count -1 for an autoscaler node type without a maximum. Each bundle must fit on one node."""
    bundle = worker_bundle(res)
    room = 0
    for resources, count in nodes:
        per_node = min(int(resources.get(key, 0.0) // need) for key, need in bundle.items() if need > 0)
        if per_node <= 0 or count == 0:
            continue
        if count < 0:
            return True
        room += per_node * count
    return room >= res.num_workers


def _autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """Node types the cluster's autoscaler may launch (empty without an autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config reachable: only live nodes count
        return []
    if config is None or not config.node_group_configs:
        # A `ray start --autoscaling-config` head (as `ray up` starts it) does not report its
        # node types to the GCS: read the cluster config `ray up` left on the head.
        return bootstrap_node_types()
    return [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]


AUTOSCALING_CONFIG_ENV = "RAYSWEEP_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster config on the head


def bootstrap_node_types() -> list[tuple[dict[str, float], int]]:
    """Worker node types of the autoscaling config this driver runs beside: ``$RAYSWEEP_AUTOSCALING_CONFIG``,
    else ``~/ray_bootstrap_config.yaml`` (on a ``ray up`` head). ``(resources, max_workers)`` pairs;
    empty when there is no such file. Ray's GCS holds the autoscaler's node types only when some
    component reports them (``state.get_cluster_config()``); a ``ray start --autoscaling-config``
    head with the standard autoscaler does not, so the file is the source the driver can read."""
    import yaml

    path = Path(os.environ.get(AUTOSCALING_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()
    try:
        config = yaml.safe_load(path.read_text())  # JSON (the bootstrap file) is YAML too
        types = config["available_node_types"]
        head = config.get("head_node_type")
        default_max = int(config.get("max_workers", 0))
        return [(dict((t.get("resources") or {})), int(t.get("max_workers", default_max)))
                for name, t in types.items() if name != head]
    except (OSError, TypeError, KeyError, ValueError, AttributeError, yaml.YAMLError):
        return []


def _shape(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if resources.get(k)]
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}" if keys else "{}"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

