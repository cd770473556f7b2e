"""``python -m raysweep.tune --space FILE --dry-run``: the plan of a sweep and an estimate of its cost.

Runs after the checks every sweep runs first (YAML, storage, resume, data, models: see
``raysweep.tune.main``), adds the ones that otherwise happen only once Ray is up — a remote
storage (``s3://``, ``gs://``, ...) accepts a write, the MLflow tracking URI answers, one trial's
workers fit the cluster (``--address``) — and prints, without starting any trial:

* the methods and each one's search space, ``num_samples``;
* the resources per trial and whether (and how many at once) they fit;
* the expected trial-epochs under ASHA, from a simulation with Ray's own ASHA bracket
  (``ray.tune.schedulers.async_hyperband._Bracket``), as in docs/SCALING.md's appendix;
* an **estimated** GPU-hours / wall-time range from the per-trial and per-epoch costs of
  docs/SCALING.md §3.3 (GPU; no GPU measurement behind them) or docs/BENCHMARKS.md (CPU, the
  embedded tiny model, measured on a 2-core laptop).

:func:`dry_run` returns 0 when a real run would start; any failed check exits 2 with one line.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Per-trial fixed cost, and per trial-epoch training and evaluation costs, in minutes, as
# (low, central, high). GPU: docs/SCALING.md §3.3 "Per trial fixed cost" ("Assumed 2 / 3 / 6 min
# per trial"), §3.1 "Training per epoch: ≈ 0.2 / 0.4 / 1.7 min" and §3.2 "Evaluation per epoch:
# ≈ 2.7 / 6.6 / 26 min" (together §3.3's "One trial-epoch: ≈ 2.9 / 7.0 / 27.7 min") — a 7B model
# (tofu.yaml: Llama-2-7B, ZeRO-3 on 2 A100-40GB per trial, TOFU-size evaluation sets), arithmetic
# from stated assumptions, not measured. The same figures are used for every GPU sweep.
GPU_SETUP_MIN = (2.0, 3.0, 6.0)
GPU_TRAIN_MIN = (0.2, 0.4, 1.7)
GPU_EVAL_MIN = (2.7, 6.6, 26.0)
# CPU: docs/BENCHMARKS.md, "The README's main command from a clean clone" (per epoch, two trials
# sharing 2 cores: training 2.6-6.2 s + evaluation 15-49 s) and "Orchestration overhead" (a
# trial's worker group starts in 14-18 s; a one-trial sweep's fixed cost 50-57 s). Measured for
# the embedded tiny model only; central = midpoint.
CPU_SETUP_MIN = (15 / 60, 35 / 60, 57 / 60)
CPU_TRAIN_MIN = (2.6 / 60, 4.4 / 60, 6.2 / 60)
CPU_EVAL_MIN = (15 / 60, 32 / 60, 49 / 60)
COST_SOURCE = {
    True: "docs/SCALING.md §3.3 (7B model, 2 x A100-40GB per trial; arithmetic, not measured on a GPU)",
    False: "docs/BENCHMARKS.md (embedded tiny model on a 2-core CPU, measured)",
}
SIMULATIONS = 200  # random sweeps per estimate
NOISE_SD = 0.3  # per-epoch noise on a trial's latent quality (docs/SCALING.md appendix)
MLFLOW_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Estimate:
    trials: int
    epochs_mean: float
    epochs_p10: float
    epochs_p90: float
    epochs_no_asha: float
    evaluations_mean: float  # evaluations per sweep (= trial-epochs under eval.every: epoch)
    eval_every: str
    concurrent: int
    setup_min: tuple[float, float, float]
    train_min: tuple[float, float, float]
    eval_min: tuple[float, float, float]
    wall_h: tuple[float, float, float]  # low, central, high (mean of the simulations)
    gpu_h: tuple[float, float, float]
    gpus_per_trial: float
    source: str


# ----------------------------------------------------------------------------- checks


def check_storage(storage: str) -> str | None:
    """None if a probe file can be written and deleted under ``storage`` (local path or URI)."""
    if "://" not in storage:
        from raysweep.sweep.cluster import writable

        return writable(Path(storage))
    try:
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(storage)
        inner = inner.rstrip("/")
        probe = f"{inner}/.raysweep-dry-run-{uuid.uuid4().hex}"
        fs.create_dir(inner, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"raysweep dry run\n")
        fs.delete_file(probe)
    except Exception as err:  # noqa: BLE001 - credentials, bucket, network: all say "not writable"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"storage {storage!r} is not writable ({type(err).__name__}: {reason})"
    return None


def check_mlflow(uri: str) -> str | None:
    """None if the tracking URI answers: an HTTP server's ``/health``, a local store's directory
    writable (a temporary file), anything else one ``search_experiments`` call. Leaves nothing."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=MLFLOW_TIMEOUT_S) as response:  # noqa: S310
                if response.status == 200:
                    return None
                return f"MLflow server {uri} answered HTTP {response.status} on /health"
        except urllib.error.HTTPError as err:
            return f"MLflow server {uri} answered HTTP {err.code} on /health"
        except (urllib.error.URLError, OSError, ValueError) as err:
            return f"MLflow server {uri} is not reachable ({getattr(err, 'reason', None) or err})"
    if scheme in ("sqlite", "file"):
        if scheme == "sqlite":
            path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
            if not path or path.startswith(":memory:"):
                return None
            directory = Path("/" + path.lstrip("/")).parent if uri.startswith("sqlite:////") else Path(path).parent
        else:
            directory = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent  # MLflow creates the missing part
        from raysweep.sweep.cluster import writable

        return writable(directory, f"MLflow store {uri}: directory", create=False)
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001
        return f"MLflow store {uri} is not usable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


# ----------------------------------------------------------------------------- the estimate


def _epoch_options(value: Any, default: int) -> list[int]:
    """The epoch counts a trial of one method may get (uniformly), from its space."""
    from raysweep.config import Range

    if value is None:
        return [int(default)]
    if not isinstance(value, Range):
        return [int(value)]
    if value.kind == "choice":
        return [int(v) for v in value.choice]
    low, high = value.bounds()
    return list(range(int(math.ceil(low)), int(math.floor(high)) + 1)) or [int(round(low))]


def trial_epoch_plan(sweep: Any, rng: random.Random) -> list[int]:
    """Each trial's ``epochs`` in start order: the enqueued paper defaults, then random draws
    (TPE's start-up; later TPE proposals are not modelled); for a grid, its points."""
    from raysweep.sweep.space import SpaceBuilder

    space = SpaceBuilder(sweep)
    search = sweep.search
    if search.algorithm == "grid":
        return [int(p["epochs"]) for p in space.grid_points()]
    plan: list[int] = []
    if search.enqueue_defaults:
        for point in space.default_points():
            method = point["method"]
            value = point.get(space.param_name(method, "epochs"))
            plan.append(int(value) if value is not None else _epoch_options(space.spaces[method].epochs,
                                                                             sweep.experiment.training.epochs)[0])
    while len(plan) < search.num_samples:
        method = rng.choice(space.methods)
        plan.append(rng.choice(_epoch_options(space.spaces[method].epochs, sweep.experiment.training.epochs)))
    return plan[: search.num_samples]


def simulate(sweep: Any, concurrent: int, setup: float, train: float, evaluate: float, seed: int,
             asha: bool = True) -> tuple[float, int, int]:
    """One random sweep: ``(wall minutes, trial-epochs, evaluations)``. Trials start as slots free
    up; each has a latent quality q ~ N(0, 1) and its objective at each evaluated epoch is
    q + N(0, 0.3^2), fed to Ray's ASHA bracket. An epoch costs ``train`` minutes, plus ``evaluate``
    when ``eval.every`` evaluates it — the epochs the worker itself evaluates
    (:func:`raysweep.eval.schedule.evaluation_epochs` with the trial's rung epochs: every epoch, or
    under ``rungs`` the rung epochs and the trial's last). ASHA decides only at rung epochs, which
    ``rungs`` always evaluates, so its decisions are the same under both settings."""
    import heapq

    from ray.tune.schedulers.async_hyperband import _Bracket

    from raysweep.eval.schedule import evaluation_epochs
    from raysweep.sweep.schedule import grace_epochs
    from raysweep.sweep.space import trial_rung_epochs

    rng = random.Random(seed)
    sched = sweep.search.scheduler
    max_t = _max_t(sweep)
    asha = asha and sched.type == "asha"
    every, rungs = sweep.experiment.eval.every, trial_rung_epochs(sweep)
    bracket = _Bracket(min_t=grace_epochs(sweep, max_t), max_t=max_t, reduction_factor=sched.reduction_factor, s=0)

    class _T:
        def __init__(self, i):
            self.trial_id = str(i)

    pending = [(_T(i), min(e, max_t), rng.gauss(0, 1)) for i, e in enumerate(trial_epoch_plan(sweep, rng))]
    evaluated_at = {e: set(evaluation_epochs(every, e, rungs)) for _, e, _ in pending}
    events: list = []
    used, end, epochs_run, evaluations, counter = 0, 0.0, 0, 0, 0

    def cost(t: int, last: int) -> float:
        return train + (evaluate if t in evaluated_at[last] else 0.0)

    def start(now: float) -> None:
        nonlocal used, counter
        while used < concurrent and pending:
            tr = pending.pop(0)
            used += 1
            counter += 1
            heapq.heappush(events, (now + setup + cost(1, tr[1]), counter, tr, 1))

    start(0.0)
    while events:
        now, _, tr, t = heapq.heappop(events)
        trial, e, q = tr
        epochs_run += 1
        evaluated = t in evaluated_at[e]
        evaluations += evaluated
        stop = asha and evaluated and bracket.on_result(trial, t, q + rng.gauss(0, NOISE_SD)) == "STOP"
        if t >= e or stop:
            used -= 1
            end = max(end, now)
            start(now)
        else:
            counter += 1
            heapq.heappush(events, (now + cost(t + 1, e), counter, tr, t + 1))
    return end, epochs_run, evaluations


def estimate(sweep: Any, concurrent: int, runs: int = SIMULATIONS) -> Estimate:
    res = sweep.search.resources
    use_gpu = bool(res.use_gpu and res.gpus_per_worker > 0)
    setup_min, train_min, eval_min = ((GPU_SETUP_MIN, GPU_TRAIN_MIN, GPU_EVAL_MIN) if use_gpu
                                      else (CPU_SETUP_MIN, CPU_TRAIN_MIN, CPU_EVAL_MIN))
    gpus = res.num_workers * res.gpus_per_worker if use_gpu else 0.0
    trials = len(trial_epoch_plan(sweep, random.Random(0)))
    walls, gpu_h = [], []
    epochs_central: list[int] = []
    evaluations: list[int] = []
    for i, (s, t, e) in enumerate(zip(setup_min, train_min, eval_min)):
        sims = [simulate(sweep, concurrent, s, t, e, seed) for seed in range(runs)]
        walls.append(statistics.mean(w for w, _, _ in sims) / 60)
        gpu_h.append(statistics.mean((trials * s + n * t + k * e) * gpus / 60 for _, n, k in sims))
        if i == 1:
            epochs_central = sorted(n for _, n, _ in sims)
            evaluations = [k for _, _, k in sims]
    no_asha = statistics.mean(sum(min(x, _max_t(sweep)) for x in trial_epoch_plan(sweep, random.Random(seed)))
                              for seed in range(runs))
    q = statistics.quantiles(epochs_central, n=10) if len(epochs_central) > 1 else [epochs_central[0]] * 9
    return Estimate(
        trials=trials, epochs_mean=statistics.mean(epochs_central),
        epochs_p10=q[0], epochs_p90=q[-1], epochs_no_asha=no_asha,
        evaluations_mean=statistics.mean(evaluations), eval_every=sweep.experiment.eval.every,
        concurrent=concurrent, setup_min=setup_min, train_min=train_min, eval_min=eval_min,
        wall_h=tuple(walls), gpu_h=tuple(gpu_h), gpus_per_trial=gpus, source=COST_SOURCE[use_gpu],
    )


def _max_t(sweep: Any) -> int:
    """ASHA's ``max_t``: ``scheduler.max_t`` or the largest epochs of the space."""
    from raysweep.sweep.space import SpaceBuilder

    return sweep.search.scheduler.max_t or SpaceBuilder(sweep).max_epochs()


# ----------------------------------------------------------------------------- capacity



def local_capacity(sweep: Any) -> tuple[int, str]:
    """Trials at once on this machine (as ``start_ray`` computes it) and a description."""
    from raysweep.sweep.cluster import _cpu_count, _gpu_count

    res = sweep.search.resources
    cpus = int(os.environ.get("RAYSWEEP_NUM_CPUS") or _cpu_count())
    fit = int(cpus // (res.num_workers * res.cpus_per_worker))
    what = f"this machine: {cpus} CPU(s)"
    if res.use_gpu and res.gpus_per_worker > 0:
        gpus = _gpu_count()
        fit = min(fit, int(gpus // (res.num_workers * res.gpus_per_worker)))
        what += f", {gpus} GPU(s)"
    return max(0, fit), what


def cluster_capacity(sweep: Any, address: str) -> tuple[int, str]:
    """Trials at once on the cluster at ``address`` (live nodes + what the autoscaler may add,
    capped by its ``trial_driver`` slots). Exits 2 via ``start_ray`` when a trial can never fit."""
    import ray

    from raysweep.sweep.cluster import TRIAL_DRIVER, _autoscaler_node_types, start_ray, worker_bundle

    start_ray(sweep, address)  # the same checks a real run makes: trial_driver slots, fit
    try:
        res = sweep.search.resources
        bundle = worker_bundle(res)
        drivers = int(ray.cluster_resources().get(TRIAL_DRIVER, 0))
        nodes = [(dict(n.get("Resources") or {}), 1) for n in ray.nodes() if n.get("Alive")]
        types = _autoscaler_node_types()
        slots, unbounded = 0, False
        for resources, count in nodes + types:
            per_node = min(int(resources.get(k, 0.0) // need) for k, need in bundle.items() if need > 0)
            if per_node <= 0 or count == 0:
                continue
            if count < 0:
                unbounded = True
            else:
                slots += per_node * count
        fit = drivers if unbounded else min(drivers, slots // res.num_workers)
        what = (f"cluster {address}: {len(nodes)} live node(s), {len(types)} autoscaler node "
                f"type(s), {drivers} {TRIAL_DRIVER} slot(s)")
        return fit, what
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- output


def _duration(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 90:
        return f"{minutes:.2g} min" if minutes < 10 else f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def _range_text(value: Any) -> str:
    from raysweep.config import Range

    if isinstance(value, Range):
        kind = value.kind
        return f"{kind} {list(value.choice) if kind == 'choice' else list(getattr(value, kind))}"
    return "-" if value is None else f"{value} (fixed)"


def describe(sweep: Any) -> list[str]:
    from raysweep.sweep.space import SpaceBuilder, num_samples

    space = SpaceBuilder(sweep)
    search = sweep.search
    lines = [f"methods ({len(space.methods)}), search {search.algorithm}, objective {search.objective}:"]
    for method in space.methods:
        parts = [f"{key} {_range_text(getattr(space.spaces[method], key))}" for key in space.keys_for(method)
                 if getattr(space.spaces[method], key) is not None]
        lines.append(f"  {method}: " + ("; ".join(parts) if parts else "experiment.training's values"))
    if search.algorithm == "grid":
        lines.append(f"trials: {len(space.grid_points())} grid point(s), each once")
    else:
        lines.append(f"num_samples: {num_samples(sweep)} (paper defaults enqueued first: {search.enqueue_defaults})")
    sched = search.scheduler
    if sched.type == "asha":
        from raysweep.sweep.schedule import grace_epochs

        max_t = sched.max_t or space.max_epochs()
        grace = grace_epochs(sweep, max_t)
        if sched.grace_period == "auto":
            grace = f"{grace} (auto: after the warm-up" + (", = max_t: no early stop)" if grace == max_t else ")")
        guards = [name for name, on in (("keep_best_per_method", sched.keep_best_per_method),
                                        ("revisit", sched.revisit)) if on]
        lines.append(f"scheduler: ASHA, grace_period {grace}, reduction_factor {sched.reduction_factor:g}, "
                     f"max_t {max_t}, metric {sched.metric}"
                     + (f", {', '.join(guards)}" if guards else ""))
    else:
        lines.append("scheduler: none (every trial runs all its epochs)")
    return lines


def dry_run(sweep: Any, space_file: str | Path, storage: str, name: str, address: str | None) -> int:
    """Print the plan; exit 2 (one line) on a failed check; return 0 when a real run would start."""
    from raysweep.config import fail
    from raysweep.sweep.mlflow_store import resolve_tracking_uri
    from raysweep.sweep.cluster import worker_bundle

    problem = check_storage(storage)
    if problem:
        fail("--storage", "", problem)
    uri = None
    if sweep.tracking.enabled:
        uri = resolve_tracking_uri(sweep.tracking.uri)
        problem = check_mlflow(uri)
        if problem:
            fail(space_file, "tracking.uri", problem)
    res = sweep.search.resources
    fit, where = cluster_capacity(sweep, address) if address else local_capacity(sweep)
    concurrent = max(1, min(sweep.search.max_concurrent, fit))
    out = [f"Dry run of {space_file}: nothing is started.", *describe(sweep)]
    bundle = ", ".join(f"{k}: {v:g}" for k, v in worker_bundle(res).items())
    out.append(f"resources per trial: {res.num_workers} Train worker(s) x {{{bundle}}}; fits ({where}): "
               f"{'yes' if fit >= 1 else 'only once the autoscaler adds nodes'}; "
               f"{concurrent} trial(s) at once (max_concurrent {sweep.search.max_concurrent})")
    out.append(f"storage: {storage}/{name} (writable)")
    out.append(f"MLflow: {uri} (reachable)" if uri else "MLflow: off (tracking.enabled: false)")
    est = estimate(sweep, concurrent)
    out.append(f"expected trial-epochs: {est.epochs_mean:.0f} with ASHA (10th-90th percentile {est.epochs_p10:.0f}-"
               f"{est.epochs_p90:.0f}), {est.epochs_no_asha:.0f} without, over {est.trials} trial(s) "
               f"(simulated with Ray's ASHA bracket, {SIMULATIONS} random sweeps; TPE's learning not modelled)")
    wall = " / ".join(_duration(h * 60) for h in est.wall_h)
    setup = " / ".join(_duration(m) for m in est.setup_min)
    train = " / ".join(_duration(m) for m in est.train_min)
    evaluation = " / ".join(_duration(m) for m in est.eval_min)
    out.append(f"expected evaluations: {est.evaluations_mean:.0f} (eval.every: {est.eval_every}"
               + (", ASHA's rung epochs and each trial's last)" if est.eval_every == "rungs" else ")"))
    out.append(f"ESTIMATE, not a measurement — wall time {wall} (low / central / high) with {concurrent} trial(s) "
               f"at once, from a fixed cost per trial of {setup}, training per trial-epoch {train} and "
               f"{evaluation} per evaluation, taken from {est.source}")
    if est.gpus_per_trial:
        glo, gmid, ghi = est.gpu_h
        out.append(f"ESTIMATE — GPU-hours used by trials: {glo:.0f} / {gmid:.0f} / {ghi:.0f} "
                   f"({est.gpus_per_trial:g} GPU(s) per trial; node-hours are higher: idle GPUs, boot, idle_timeout)")
    else:
        out.append("GPU-hours: 0 (a CPU sweep)")
    out.append(f"would start: {est.trials} trial(s) in {storage}/{name}")
    print("\n".join(out), flush=True)
    return 0
