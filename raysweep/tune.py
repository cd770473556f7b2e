"""``python -m raysweep.tune``: a Ray Tune sweep over unlearning methods and hyperparameters.

::

    python -m raysweep.tune --space search_spaces/tiny.yaml [--num-samples N] [--max-concurrent K]
        [--storage DIR] [--name NAME] [--resume] [--address auto|HOST:PORT] [--mlflow-uri URI]
        [--set KEY=VALUE ...]

What happens, in order:

1. The YAML is validated completely (``raysweep.config.load_or_exit``; ``--num-samples``,
   ``--max-concurrent`` and ``--mlflow-uri`` are applied as ``--set`` overrides), then the
   machine-dependent checks run (:func:`preflight`: storage writable, experiment to resume
   exists, GPUs present, a trial fits the machine). Any problem: one line on stderr naming the
   file (or flag) and key, exit code 2, and Ray was never started.
2. Ray: a local instance (``resources={"trial_driver": K}``) or, with ``--address`` /
   ``RAY_ADDRESS``, an existing cluster whose nodes declare the ``trial_driver`` resource.
3. Tune: ``OptunaSearch`` (TPE, seeded) over a define-by-run space (:class:`SpaceBuilder`), the
   paper's defaults of each method enqueued first, ``ConcurrencyLimiter(max_concurrent)``, ASHA on
   ``objective`` per reported epoch (``training_iteration``) or no scheduler. One trial is
   ``raysweep.trial.run_trial`` (a Ray Train job per trial).
4. At the end: a results table sorted by objective, ``best.json`` and ``trials.json`` in the
   experiment directory ``<storage>/<name>``, the report (``report.md``, ``mu_fe.png``,
   ``objective_history.png``, ``steps.png`` for continual sweeps; :mod:`raysweep.report`), and
   the MLflow runs closed. Exit 0 if at least one trial finished, 1 if all failed, 130 if the
   sweep was interrupted (resume it with ``--resume``).

MLflow (:mod:`raysweep.tracking`): one parent run per sweep (created before Ray starts; an
unusable store exits 2), one child run per trial (``TrackingCallback``), per-epoch
generations tables logged by each trial's rank-0 worker. Tracking URI: ``--mlflow-uri`` >
``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``, made absolute and
saved in ``sweep.json``.

Objective: ``objective = (MU + FE) / 2``, maximised. With ``search.objective: pareto`` Optuna
optimises ``[MU, FE]`` (both maximised, multi-objective TPE) and the Pareto front of finished
trials is reported; ASHA needs one number, so the scheduler still stops trials on ``objective``.

Layout of ``<storage>/<name>``: Tune's experiment state, one ``run_trial_<id>/`` per trial
(``params.json``, ``result.json``, ``experiment.json`` = the trial's full ExperimentConfig,
``outputs/`` = ``training.output_dir``, ``train_*/checkpoint_epoch_NNNN`` = the checkpoint Ray
kept, ``error.txt`` / ``diverged.txt`` when it failed), ``sweep.json`` (the validated sweep
configuration; ``--resume`` continues with it), ``mlflow.json`` (tracking URI, MLflow experiment
id and parent run id; ``--resume`` reuses that run), ``trials.json``, ``best.json``, ``report.md``
and the plots.
On a multi-node cluster the storage must be shared by all nodes (NFS path or ``s3://...``).

Environment: ``RAYSWEEP_WORKER`` (the worker function, see :mod:`raysweep.trial`),
``RAYSWEEP_NUM_CPUS`` / ``RAYSWEEP_OBJECT_STORE_MB`` (local Ray only; defaults: all CPUs,
256 MB). Every ``RAYSWEEP_*`` variable of the driver (e.g. ``RAYSWEEP_CACHE``) is set in the
Train workers too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from raysweep.config import Range, SweepConfig, fail, load_or_exit
from raysweep.trial import (
    GRID_KEY, PARAM_KEYS, WORKER_ENV, TrialSetup, is_remote, run_trial, sampled_params, trial_experiment, worker_resources,
)

TRIAL_DRIVER = "trial_driver"
SWEEP_FILE = "sweep.json"  # the validated configuration, saved for --resume
DEFAULT_STORAGE = "ray_results"
# Columns of the progress table: config key / metric -> header.
PARAMETER_COLUMNS = {"method": "method", "lr": "lr", "epochs": "epochs", "forget_coeff": "α", "beta": "β"}
METRIC_COLUMNS = {"epoch": "epoch", "MU": "MU", "FE": "FE", "objective": "objective"}
FINISHED, ERRORED = "TERMINATED", "ERROR"
# Tune's bookkeeping keys, left out of the per-epoch metrics we keep.
_TUNE_KEYS = {
    "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "should_checkpoint", "checkpoint_dir_name",
}


# ----------------------------------------------------------------------------- search space


def uses_beta(method: str) -> bool:
    """β matters only for NPO/DPO forget losses and the AP regularizer."""
    from raysweep.losses import parse_method

    m = parse_method(method)
    return m.forget.name in ("NPO", "DPO") or (m.regularizer is not None and m.regularizer.name == "AP")


def _canonical(method: str) -> str:
    from raysweep.losses import parse_method

    return parse_method(method).name


def _suggest(trial: Any, name: str, key: str, value: Range) -> Any:
    kind = value.kind
    if kind == "loguniform":
        low, high = value.loguniform
        out = trial.suggest_float(name, float(low), float(high), log=True)
    elif kind == "uniform":
        low, high = value.uniform
        out = trial.suggest_float(name, float(low), float(high))
    elif kind == "int":
        low, high = value.int
        out = trial.suggest_int(name, int(low), int(high))
    else:
        out = trial.suggest_categorical(name, list(value.choice))
    if key in ("epochs", "lora_r"):
        out = int(round(out))
    return out


def _snap(value: Range, target: float) -> Any:
    """``target`` moved into the range: clipped, rounded for ints, nearest for a choice list."""
    kind = value.kind
    if kind == "choice":
        options = list(value.choice)
        if target in options:
            return target
        numeric = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
        if not numeric:
            return options[0]
        if target > 0 and all(o > 0 for o in numeric):
            return min(numeric, key=lambda o: abs(math.log(o) - math.log(target)))
        return min(numeric, key=lambda o: abs(o - target))
    low, high = value.bounds()
    clipped = min(max(target, low), high)
    return int(round(clipped)) if kind == "int" else float(clipped)


class SpaceBuilder:
    """Optuna define-by-run space: ``method`` first, then that method's own parameters.

    Optuna's parameter names are namespaced per method (``"ME+GD/lr"``) so that TPE models each
    method's space separately; the returned dict also holds them flat (``lr``, ``epochs``, ...),
    which is what the trial and the progress table read. β is sampled only for methods that use
    it (NPO, DPO, AP): a GA trial's config has no ``beta``. A parameter given as a scalar is fixed;
    one not given at all takes ``experiment.training``'s value (shown in the table, not searched).

    Module-level and picklable: Tune saves it with the searcher state for ``--resume``.
    """

    def __init__(self, sweep: SweepConfig):
        search, training = sweep.search, sweep.experiment.training
        self.methods = list(search.methods)
        self.spaces = {m: search.space_for(m) for m in self.methods}
        self.training_values = {
            "lr": training.lr,
            "epochs": training.epochs,
            "forget_coeff": training.forget_coeff,
            "reg_coeff": training.reg_coeff,
            "beta": training.beta,
        }
        self.paper_targets = {
            "lr": training.lr,
            "epochs": training.epochs,
            "beta": 0.1,
            "reg_coeff": 1.0,
            "lora_r": training.lora.r if training.lora.enabled else 0,
        }

    @staticmethod
    def param_name(method: str, key: str) -> str:
        return f"{method}/{key}"

    def keys_for(self, method: str) -> list[str]:
        return [k for k in PARAM_KEYS if k != "beta" or uses_beta(method)]

    def __call__(self, trial: Any) -> dict[str, Any]:
        method = trial.suggest_categorical("method", self.methods)
        space = self.spaces[method]
        out: dict[str, Any] = {"method": method}
        for key in self.keys_for(method):
            value = getattr(space, key)
            if isinstance(value, Range):
                out[key] = _suggest(trial, self.param_name(method, key), key, value)
            elif (fixed := self._fixed(key, value)) is not None:
                out[key] = fixed
        return out

    def _fixed(self, key: str, value: Any) -> Any:
        """A key that is not searched: its scalar from the space, else ``experiment.training``'s
        value (None when neither gives one)."""
        if value is not None:
            return int(value) if key in ("epochs", "lora_r") else value
        return self.training_values.get(key)

    def default_points(self) -> list[dict[str, Any]]:
        """The paper's defaults of each method, as Optuna parameters (for ``enqueue_trial``)."""
        points = []
        for method in self.methods:
            targets = dict(self.paper_targets, forget_coeff=0.1 if _canonical(method) == "ME+GD" else 1.0)
            point: dict[str, Any] = {"method": method}
            for key in self.keys_for(method):
                value = getattr(self.spaces[method], key)
                if isinstance(value, Range):
                    point[self.param_name(method, key)] = _snap(value, targets[key])
            points.append(point)
        return points

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of each method's choice lists, as trial configs (``algorithm: grid``).

        Scalars are fixed, unset keys take ``experiment.training``'s value, as in :meth:`__call__`;
        the config validation guarantees no continuous range is left.
        """
        points = []
        for method in self.methods:
            keys, options = [], []
            for key in self.keys_for(method):
                value = getattr(self.spaces[method], key)
                if isinstance(value, Range):
                    values = [int(v) if key in ("epochs", "lora_r") else v for v in value.choice]
                elif (fixed := self._fixed(key, value)) is not None:
                    values = [fixed]
                else:
                    continue
                keys.append(key)
                options.append(values)
            for combo in itertools.product(*options):
                points.append({"method": method, **dict(zip(keys, combo))})
        return points

    def max_epochs(self) -> int:
        best = 1
        for space in self.spaces.values():
            value = space.epochs
            if isinstance(value, Range):
                best = max(best, int(value.bounds()[1]))
            elif value is not None:
                best = max(best, int(value))
            else:
                best = max(best, int(self.training_values["epochs"]))
        return best


def build_searcher(sweep: SweepConfig, space: SpaceBuilder):
    """``OptunaSearch`` (TPE seeded with ``search.seed``) wrapped in a ``ConcurrencyLimiter``;
    for ``algorithm: grid``, Tune's ``BasicVariantGenerator`` over :meth:`SpaceBuilder.grid_points`."""
    search = sweep.search
    if search.algorithm == "grid":  # the points themselves are the param_space (param_space())
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=search.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group: TPE models each method's (conditional) parameters jointly;
        # constant_liar: concurrent trials do not all pick the same point.
        sampler = optuna.samplers.TPESampler(
            seed=search.seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=search.startup_trials(),
        )
    if search.objective == "pareto":
        metric, mode = ["MU", "FE"], ["max", "max"]
    else:
        metric, mode = "objective", "max"
    searcher = OptunaSearch(
        space=space,
        metric=metric,
        mode=mode,
        sampler=sampler,
        points_to_evaluate=space.default_points() if search.enqueue_defaults else None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)


def num_samples(sweep: SweepConfig) -> int:
    """Trials to run: ``search.num_samples``; a grid runs each of its points once."""
    return 1 if sweep.search.algorithm == "grid" else sweep.search.num_samples


def param_space(sweep: SweepConfig, space: SpaceBuilder) -> dict[str, Any] | None:
    """Tune's ``param_space``: none for Optuna (define-by-run); a grid search over whole trial
    configs for ``algorithm: grid`` (each method has its own keys, so no per-key grid)."""
    if sweep.search.algorithm != "grid":
        return None
    from ray import tune

    return {GRID_KEY: tune.grid_search(space.grid_points())}


def build_scheduler(sweep: SweepConfig, space: SpaceBuilder):
    """ASHA on ``objective`` per reported epoch (also in Pareto mode: it needs one number)."""
    sched = sweep.search.scheduler
    if sched.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        metric="objective",
        mode="max",
        max_t=sched.max_t or space.max_epochs(),
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def build_reporter(sweep: SweepConfig, space: SpaceBuilder):
    """Tune's progress table with our columns (needs ``RAY_AIR_NEW_OUTPUT=0``, set in main)."""
    from ray import tune

    params = dict(PARAMETER_COLUMNS)
    for key, header in (("reg_coeff", "γ"), ("lora_r", "lora_r")):
        if any(isinstance(getattr(s, key), Range) for s in space.spaces.values()):
            params[key] = header
    if sweep.search.algorithm == "grid":  # the values live under the grid point's key
        params = {f"{GRID_KEY}/{key}": header for key, header in params.items()}
    return tune.CLIReporter(parameter_columns=params, metric_columns=dict(METRIC_COLUMNS), max_report_frequency=10)


def tune_callbacks(sweep: SweepConfig, experiment_path: str) -> list:
    """Extra Tune callbacks of the sweep: MLflow tracking (``raysweep.tracking.TrackingCallback``).

    The callback creates and ends each trial's child run under the sweep's parent run (whose id
    it reads from ``<experiment_path>/mlflow.json``) and logs each epoch's metrics. It is pickled
    with the Tuner (``--resume`` restores it) and never calls ``mlflow.set_experiment()``.
    """
    from raysweep.tracking import tune_callback

    return [tune_callback(sweep, experiment_path)] if sweep.tracking.enabled else []


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (``run_trial_<id>``) instead of Tune's parameter strings."""
    return f"{trial.trainable_name}_{trial.trial_id}"


# ----------------------------------------------------------------------------- checks


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


def _writable(directory: Path) -> str | None:
    """None if ``directory`` can be created and written, else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".raysweep-write-test-"):
            pass
    except OSError as err:
        return f"storage directory {str(directory)!r} is not writable ({err.strerror or err})"
    return None


def _can_restore(path: str) -> bool:
    from ray.tune import Tuner

    try:
        return Tuner.can_restore(path)
    except Exception:  # noqa: BLE001 - unreadable or odd path: nothing to restore
        return False


def preflight(args: argparse.Namespace, sweep: SweepConfig) -> tuple[str, str, str | None]:
    """Machine-dependent checks before Ray starts; returns ``(storage, name, address)``.

    Exits 2 (one line on stderr) when the storage is not writable, ``--resume`` finds no
    experiment, a new sweep would overwrite one, GPUs are requested but absent, or one trial's
    workers can never fit on this machine.
    """
    space_file = args.space
    search = sweep.search
    address = args.address or os.environ.get("RAY_ADDRESS") or None

    if args.storage:
        storage_raw, storage_key, storage_file = str(args.storage), "", "--storage"
    elif search.storage_path is not None:
        storage_raw, storage_key, storage_file = str(search.storage_path), "search.storage_path", space_file
    else:
        storage_raw, storage_key, storage_file = DEFAULT_STORAGE, "", "--storage"
    if is_remote(storage_raw):
        storage = storage_raw.rstrip("/")
    else:
        storage = str(Path(storage_raw).expanduser().resolve())
        why = _writable(Path(storage))
        if why:
            fail(storage_file, storage_key, why)

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


# ----------------------------------------------------------------------------- Ray


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
    root = str(Path(__file__).resolve().parent.parent)
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
    if config is None:
        return []
    return [(dict(group.resources), int(group.max_count)) for group in config.node_group_configs]


def _shape(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if resources.get(k)]
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}" if keys else "{}"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- results


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if key in _TUNE_KEYS or key.startswith("config/"):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        if value is None:
            continue
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


def _read_text(path: str | None, filesystem: Any = None) -> str | None:
    if not path:
        return None
    try:
        if filesystem is not None:
            with filesystem.open_input_stream(path) as f:
                return f.readall().decode("utf-8", "replace")
        return Path(path).read_text(errors="replace")
    except Exception:  # noqa: BLE001
        return None


def error_reason(text: str | None) -> str | None:
    """One line from a Tune ``error.txt``: our divergence message, else the last exception line."""
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if "TrialDiverged: " in line:
            return line.split("TrialDiverged: ", 1)[1]
    for line in reversed(lines):
        if ": " in line and not line.startswith(("File ", "^", "~")):
            return line[:500]
    return lines[-1][:500] if lines else None


def summarize(experiment_path: str) -> list[dict[str, Any]]:
    """One summary per trial of the experiment, read back from its directory."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    summaries = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        if frame is None:
            frame = frames.get(trial.path)
        history = [] if frame is None or frame.empty else [_clean_row(r) for r in frame.to_dict("records")]
        history = [h for h in history if "objective" in h]
        params = sampled_params(trial.config)
        summary: dict[str, Any] = {
            "trial_id": trial.trial_id,
            "trial_name": Path(trial.path).name if trial.path else str(trial),
            "path": trial.path,
            "status": trial.status,
            "started": _started(trial, frame),
            "params": params,
            "history": history,
            "best_epoch": None,
            "best": None,
            "last": history[-1] if history else None,
            "checkpoint": None,
            "early_stopped": False,
            "error": None,
        }
        if history:
            best = max(history, key=lambda h: (h["objective"], -h.get("epoch", 0)))
            summary["best"] = best
            summary["best_epoch"] = best.get("epoch")
            checkpoints = [h["checkpoint_path"] for h in history if h.get("checkpoint_path")]
            summary["checkpoint"] = best.get("checkpoint_path") or (checkpoints[-1] if checkpoints else None)
            planned = params.get("epochs")
            summary["early_stopped"] = (
                trial.status == FINISHED and planned is not None and int(history[-1].get("epoch", planned)) < int(planned)
            )
        if trial.status == ERRORED:
            fs = getattr(getattr(trial, "storage", None), "storage_filesystem", None)
            filename = getattr(trial.run_metadata, "error_filename", None) or "error.txt"
            error_path = f"{trial.path}/{filename}"
            if fs is not None and hasattr(trial.storage, "trial_fs_path"):
                text = _read_text(f"{trial.storage.trial_fs_path}/{filename}", fs)
            else:
                text = _read_text(error_path)
            summary["error"] = error_reason(text) or "errored (no error file)"
        summaries.append(summary)
    summaries.sort(key=lambda s: (s["started"] is None, s["started"] or 0.0))  # trial start order
    return summaries


def _started(trial: Any, frame: Any) -> float | None:
    """When Tune first set the trial RUNNING (unix seconds; kept across ``--resume``), else an
    estimate from its first result."""
    value = getattr(getattr(trial, "run_metadata", None), "start_time", None)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        if frame is not None and not frame.empty and {"timestamp", "time_total_s"} <= set(frame.columns):
            first = frame.iloc[0]
            return float(first["timestamp"]) - float(first["time_total_s"])
    except (TypeError, ValueError, KeyError):
        pass
    return None


def pareto_front(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials whose final (MU, FE) no other finished trial dominates."""
    points = [s for s in summaries if s["status"] == FINISHED and s["last"] and "MU" in s["last"] and "FE" in s["last"]]

    def dominates(a, b):
        return a["MU"] >= b["MU"] and a["FE"] >= b["FE"] and (a["MU"] > b["MU"] or a["FE"] > b["FE"])

    return [s for s in points if not any(dominates(o["last"], s["last"]) for o in points if o is not s)]


def best_record(sweep: SweepConfig, experiment_path: str, summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Content of ``best.json``: the finished trial with the highest objective at its best epoch."""
    finished = [s for s in summaries if s["status"] == FINISHED and s["best"]]
    if not finished:
        return None
    best = max(finished, key=lambda s: s["best"]["objective"])
    output_dir = None if is_remote(best["path"] or "") else str(Path(best["path"]) / "outputs")
    config = trial_experiment(sweep.experiment, best["params"], output_dir)
    record: dict[str, Any] = {
        "experiment_path": experiment_path,
        "objective": sweep.search.objective,
        "objective_definition": "(MU + FE) / 2, maximised",
        "trial_id": best["trial_id"],
        "trial_name": best["trial_name"],
        "trial_path": best["path"],
        "status": best["status"],
        "early_stopped": best["early_stopped"],
        "params": best["params"],
        "best_epoch": best["best_epoch"],
        "metrics": {k: v for k, v in best["best"].items() if k != "checkpoint_path"},
        "checkpoint": best["checkpoint"],
        "config": config.model_dump(mode="json"),
        "trials": {
            "total": len(summaries),
            "finished": sum(s["status"] == FINISHED for s in summaries),
            "early_stopped": sum(s["early_stopped"] for s in summaries),
            "errored": sum(s["status"] == ERRORED for s in summaries),
        },
    }
    if sweep.search.objective == "pareto":
        record["pareto_front"] = [
            {"trial_id": s["trial_id"], "params": s["params"], "epoch": s["last"].get("epoch"),
             "MU": s["last"]["MU"], "FE": s["last"]["FE"], "objective": s["last"].get("objective"),
             "checkpoint": s["checkpoint"]}
            for s in sorted(pareto_front(summaries), key=lambda s: -s["last"]["MU"])
        ]
    return record


def write_json(path: str, data: Any, mkdir: bool = False) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    if is_remote(path):
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        if mkdir:
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
    else:
        if mkdir:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def read_json(path: str) -> Any:
    """The parsed file, or None if it does not exist."""
    try:
        if is_remote(path):
            import pyarrow.fs

            fs, inner = pyarrow.fs.FileSystem.from_uri(path)
            with fs.open_input_stream(inner) as f:
                return json.loads(f.readall().decode())
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, OSError):
        return None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Trials sorted by objective (best epoch), errored and result-less trials last."""
    headers = ["trial", "status", "method", "lr", "epochs", "α", "β", "epoch", "MU", "FE", "objective", "note"]
    ranked = sorted(summaries, key=lambda s: (s["status"] != FINISHED, s["best"] is None,
                                              -(s["best"] or {}).get("objective", 0.0)))
    rows = []
    for s in ranked:
        p, b = s["params"], s["best"] or {}
        note = s["error"] or ("early-stopped" if s["early_stopped"] else "")
        if s["checkpoint"] and not s["error"]:
            note = (note + " " if note else "") + "checkpoint"
        rows.append([
            s["trial_id"], s["status"], p.get("method"), _fmt(p.get("lr")), _fmt(p.get("epochs")),
            _fmt(p.get("forget_coeff")), _fmt(p.get("beta")), _fmt(b.get("epoch")), _fmt(b.get("MU")),
            _fmt(b.get("FE")), _fmt(b.get("objective")), note,
        ])
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the note column is free-length
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raysweep.tune",
        description="Ray Tune sweep of LLM unlearning methods (Optuna TPE + ASHA).",
    )
    parser.add_argument("--space", required=True, help="sweep YAML (experiment/search/tracking)")
    parser.add_argument("--num-samples", type=int, help="number of trials (search.num_samples)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (search.max_concurrent)")
    parser.add_argument("--storage", help="results root (default: search.storage_path or ./ray_results)")
    parser.add_argument("--name", help="experiment name (default: <experiment.name>-<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the experiment <storage>/<name> (default: the latest <experiment.name>-*)")
    parser.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT; default: $RAY_ADDRESS, else local)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (tracking.uri)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set search.scheduler.type=none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"search.num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        overrides.append(f"search.max_concurrent={args.max_concurrent}")
    if args.mlflow_uri is not None:
        overrides.append(f"tracking.uri={args.mlflow_uri}")
    sweep = load_or_exit(args.space, overrides)
    space = SpaceBuilder(sweep)
    sched = sweep.search.scheduler
    if sched.type == "asha" and sched.grace_period > (sched.max_t or space.max_epochs()):
        fail(args.space, "search.scheduler.grace_period",
             f"{sched.grace_period} is larger than max_t ({sched.max_t or space.max_epochs()} epochs)")
    try:
        worker = os.environ.get(WORKER_ENV)
        if worker:
            from raysweep.trial import resolve_worker

            resolve_worker(worker)  # fail now, not in every trial
    except Exception as err:  # noqa: BLE001
        fail(WORKER_ENV, "", f"cannot load worker {worker!r}: {err}")
    storage, name, address = preflight(args, sweep)
    if not args.resume:
        from raysweep.scenarios import preflight_data

        preflight_data(sweep.experiment)  # bad data files: exit 2 before Ray starts
    if not os.environ.get(WORKER_ENV):
        from raysweep.scenarios import ensure_embedded_for

        # Build (or find) the embedded default here, with every core, rather than in the
        # first trial while the others wait on its lock. (A replacement worker, as in the
        # tests, may not need it.)
        ensure_embedded_for(sweep.experiment)
    experiment_path = f"{storage}/{name}"
    saved = f"{experiment_path}/{SWEEP_FILE}"
    from raysweep.tracking import NoTracker, SweepTracker, resolve_tracking_uri

    # An absolute tracking URI (relative sqlite paths resolved here), saved with the sweep: Ray
    # workers with another working directory and a later --resume write the same store.
    sweep.tracking.uri = resolve_tracking_uri(sweep.tracking.uri)
    if args.resume:
        # The experiment continues with the configuration it started with.
        original = read_json(saved)
        if original is not None:
            original_sweep = SweepConfig.model_validate(original)
            original_sweep.tracking.uri = resolve_tracking_uri(original_sweep.tracking.uri)
            if original_sweep != sweep:
                print(f"note: resuming with the configuration saved in {saved}, not {args.space}", file=sys.stderr)
            sweep, space = original_sweep, SpaceBuilder(original_sweep)
    else:
        write_json(saved, sweep.model_dump(mode="json"), mkdir=True)
    try:
        tracker = (SweepTracker.start(sweep, experiment_path, resume=args.resume) if sweep.tracking.enabled
                   else NoTracker())
    except Exception as err:  # noqa: BLE001 - an unusable store: say so before Ray starts
        key_file = "--mlflow-uri" if args.mlflow_uri else args.space
        fail(key_file, "" if args.mlflow_uri else "tracking.uri",
             f"cannot open MLflow store {sweep.tracking.uri!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    print(f"MLflow: {tracker.url()}", flush=True)

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic CLIReporter table with our columns
    import ray
    from ray import tune

    try:
        start_ray(sweep, address)
        setup = TrialSetup.from_sweep(sweep, experiment_path, tracking=tracker.trial_info())
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {TRIAL_DRIVER: 1, "CPU": 0})
        resume_hint = "python -m raysweep.tune " + shlex.join(
            ["--space", str(args.space), "--storage", storage, "--name", name, "--resume"]
            + [part for o in args.overrides for part in ("--set", o)])
        if args.resume:
            print(f"Resuming {experiment_path}", flush=True)
            if args.num_samples is not None or args.max_concurrent is not None:
                print("note: --num-samples/--max-concurrent are fixed by the original run on --resume", file=sys.stderr)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
        else:
            print(f"Experiment {experiment_path}\n(to resume if interrupted: {resume_hint})", flush=True)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(sweep, space),
                tune_config=tune.TuneConfig(
                    search_alg=build_searcher(sweep, space),
                    scheduler=build_scheduler(sweep, space),
                    num_samples=num_samples(sweep),
                    trial_dirname_creator=trial_dirname,
                    trial_name_creator=trial_dirname,
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=sweep.search.max_failures),
                    progress_reporter=build_reporter(sweep, space),
                    callbacks=tune_callbacks(sweep, experiment_path),
                    verbose=2,  # status tables and trial ends, not every result dict
                ),
            )
        tuner.fit()
    except BaseException as err:
        # Nothing of this sweep stays RUNNING in MLflow (interrupted: KILLED, a crash: FAILED).
        tracker.abort("FAILED" if isinstance(err, Exception) else "KILLED")
        raise
    finally:
        ray.shutdown()

    summaries = summarize(experiment_path)
    print("\nResults (sorted by objective at each trial's best epoch):")
    print(results_table(summaries))
    write_json(f"{experiment_path}/trials.json", summaries)
    unfinished = [s for s in summaries if s["status"] not in (FINISHED, ERRORED)]
    record = best_record(sweep, experiment_path, summaries)
    if record is not None:
        write_json(f"{experiment_path}/best.json", record)
        m = record["metrics"]
        print(f"\nBest trial {record['trial_id']} ({record['params'].get('method')}): objective "
              f"{m.get('objective'):.4f} (MU {m.get('MU', float('nan')):.4f}, FE {m.get('FE', float('nan')):.4f}) "
              f"at epoch {record['best_epoch']}; written to {experiment_path}/best.json")
        if record.get("pareto_front") is not None:
            print(f"Pareto front (MU, FE): {len(record['pareto_front'])} trial(s), listed in best.json")
    report_files: list = []
    try:
        from raysweep.report import report_sweep

        report_files = report_sweep(summaries, record, experiment_path)
        print(f"Report: {experiment_path}/report.md (+ {len(report_files) - 1} plot(s))")
    except Exception as err:  # noqa: BLE001 - the sweep's results are in; the report is extra
        print(f"warning: the report could not be written: {type(err).__name__}: {err}", file=sys.stderr)
    if is_remote(experiment_path):  # MLflow logs local files: copies of the two results
        local = Path(tempfile.mkdtemp(prefix="raysweep-results-"))
        write_json(str(local / "trials.json"), summaries)
        if record is not None:
            write_json(str(local / "best.json"), record)
        artifacts = sorted(str(p) for p in local.glob("*.json"))
    else:
        artifacts = [p for p in (f"{experiment_path}/best.json", f"{experiment_path}/trials.json") if Path(p).is_file()]
    tracker.finalize(summaries, record, [*artifacts, *report_files], interrupted=bool(unfinished))
    from raysweep.sweep.mlflow_ui import announce  # the runs view's direct URL (+ its columns)
    announce(tracker)
    if unfinished:
        print(f"\nThe sweep was interrupted ({len(unfinished)} trial(s) unfinished). Resume with:\n  {resume_hint}",
              file=sys.stderr)
        return 130
    if record is None:
        errors = sorted({s["error"] for s in summaries if s["error"]})
        print(f"error: all {len(summaries)} trial(s) failed; no result. Reasons: " + "; ".join(errors or ["none recorded"]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: objects Tune pickles for --resume
    # (the search space, the trial name creator) must refer to ``raysweep.tune``.
    from raysweep.tune import main as _main

    sys.exit(_main())
