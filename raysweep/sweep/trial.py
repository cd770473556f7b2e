"""The Ray side of one trial: a Tune function trainable that runs a Ray Train job.

Three layers, each a plain module-level function so that Ray can pickle it by reference:

* :func:`run_trial` is the **Tune function trainable** (the "trial driver", placed by Tune on a
  node with a free ``trial_driver`` resource). It turns the sampled parameters into the trial's
  :class:`~raysweep.config.ExperimentConfig` (:func:`trial_experiment`) and runs
  ``TorchTrainer(train_worker, ...).fit()`` with ``TuneReportCallback``, so that every epoch the
  workers report reaches Tune (ASHA, Optuna, the progress table).
* :func:`train_worker` runs on **every Train rank**: it sets the thread count, rebuilds the
  config and calls the unlearning worker (``raysweep.runner.run_experiment`` by default) with a
  :class:`RayReporter`.
* :class:`RayReporter` turns each ``EpochReport`` into ``ray.train.report(metrics)`` on every
  rank (rank 0 attaches the checkpoint directory when the epoch saved one).

The worker function is pluggable so that the Ray mechanics can be tested without a model:
``RAYSWEEP_WORKER=module:function`` or ``RAYSWEEP_WORKER=/path/to/file.py:function`` in the
driver's environment (read once by ``raysweep.tune`` and shipped to the workers in the trial's
config). The function is called as ``fn(cfg: ExperimentConfig, reporter, use_gpu=bool)`` and
must call ``reporter(report)`` once per epoch on every rank, where ``report`` has the attributes
``epoch``, ``metrics`` and ``checkpoint`` of ``raysweep.train.EpochReport`` (or is a metrics dict).

A Train worker process that dies (SIGKILL, the OOM killer, a lost node) ends the attempt with
:class:`TrialWorkerDied` and a one-line reason; Tune retries it per ``search.max_failures``.

Divergence: a ``DivergenceError`` (recognised by class name anywhere in the exception chain, so
this module does not import the heavy ``raysweep.train``) ends the trial as ERRORED with the
message ``DivergenceError: ...``; the message is also written to ``diverged.txt`` in the trial
directory, so that a retry (``FailureConfig(max_failures)``) or a ``--resume`` of the errored
trial fails again at once instead of re-running a deterministic divergence.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raysweep.sweep.cluster import worker_resources
from raysweep.sweep.results import result_step, sampled_params
from raysweep.sweep.space import trial_experiment, trial_rung_epochs
from raysweep.sweep.storage import is_remote

WORKER_ENV = "RAYSWEEP_WORKER"
DEFAULT_WORKER = "raysweep.runner:run_experiment"
DIVERGED_FILE = "diverged.txt"
FORWARDED_ENV_PREFIX = "RAYSWEEP_"


class TrialDiverged(RuntimeError):
    """Raised by the trial driver when the worker's loss diverged (Tune marks the trial ERRORED)."""


class TrialWorkerDied(RuntimeError):
    """Raised by the trial driver when a Train worker process died (SIGKILL, the OOM killer, a
    crash): Tune retries the trial per ``search.max_failures``, then records it ERRORED with this
    one-line reason instead of Ray's page of text."""



@dataclass
class TrialSetup:
    """Everything a trial needs besides its sampled parameters (picklable, shipped by Tune)."""

    experiment: dict[str, Any]  # ExperimentConfig.model_dump(mode="json") of the sweep
    experiment_path: str  # <storage>/<name>: the trial directories live below it
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    worker: str = DEFAULT_WORKER
    env: dict[str, str] = field(default_factory=dict)  # RAYSWEEP_* of the driver, for the workers
    # MLflow (raysweep.sweep.tracking.SweepTracker.trial_info()): uri, experiment_id, parent_run_id,
    # redact_forget, log_generations; None = no generations logged by the workers.
    tracking: dict[str, Any] | None = None

    @classmethod
    def from_sweep(cls, sweep: Any, experiment_path: str, worker: str | None = None,
                   tracking: dict[str, Any] | None = None) -> "TrialSetup":
        res = sweep.search.resources
        experiment = sweep.experiment.model_dump(mode="json")
        experiment["eval"]["rung_epochs"] = trial_rung_epochs(sweep)  # for eval.every: rungs
        return cls(
            experiment=experiment,
            experiment_path=str(experiment_path),
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            cpus_per_worker=res.cpus_per_worker,
            gpus_per_worker=res.gpus_per_worker,
            worker=worker or os.environ.get(WORKER_ENV) or DEFAULT_WORKER,
            env={k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)},
            tracking=tracking,
        )

    def resources_per_worker(self) -> dict[str, float]:
        return worker_resources(self.cpus_per_worker, self.use_gpu, self.gpus_per_worker)



# ----------------------------------------------------------------------------- the trial driver


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one unlearning run as a Ray Train job on ``num_workers`` ranks."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir_name = Path(tune.get_context().get_trial_dir()).name
    trial_path = f"{setup.experiment_path.rstrip('/')}/{trial_dir_name}"
    local = not is_remote(trial_path)

    marker = Path(trial_path) / DIVERGED_FILE
    if local and marker.is_file():
        # A retry or --resume of a trial that diverged: deterministic, so do not train again.
        raise TrialDiverged(marker.read_text().strip() + " (recorded earlier; not re-run)")

    params = sampled_params(config)
    output_dir = str(Path(trial_path) / "outputs") if local else None
    cfg = trial_experiment(setup.experiment, params, output_dir)
    if local:
        Path(trial_path).mkdir(parents=True, exist_ok=True)
        (Path(trial_path) / "experiment.json").write_text(cfg.model_dump_json(indent=2))
    tracking = None
    if setup.tracking and setup.tracking.get("log_generations", True):
        # Rank 0 logs the generations table on the trial's MLflow child run, which the driver's
        # TrackingCallback created (found by trial id) before this function started.
        tracking = {**setup.tracking, "trial_id": tune.get_context().get_trial_id(), "params": params}

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "use_gpu": setup.use_gpu,
            "cpus_per_worker": setup.cpus_per_worker,
            "worker": setup.worker,
            "env": setup.env,
            "tracking": tracking,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.num_workers,
            use_gpu=setup.use_gpu,
            resources_per_worker=setup.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            # A fresh name per attempt: a retried or resumed trial starts a new Train run
            # instead of picking up the checkpoint bookkeeping of the interrupted one.
            name="train_" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f"),
            storage_path=trial_path,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=0),  # retries: Tune's FailureConfig
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="objective", checkpoint_score_order="max"
            ),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - classified below, re-raised
        message = divergence_message(err)
        if message is None:
            died = worker_death_message(err)
            if died is not None:
                raise TrialWorkerDied(died) from err
            raise
        if local:
            try:
                marker.write_text(message + "\n")
            except OSError:
                pass
        raise TrialDiverged(message) from None


def divergence_message(err: BaseException) -> str | None:
    """``"DivergenceError: ..."`` if a ``DivergenceError`` is anywhere in ``err``'s chain."""
    for exc in _exception_chain(err, also=("controller_failure", "_error")):
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "DivergenceError" in names or "TrialDiverged" in names:
            text = str(exc).strip().splitlines()
            # A RayTaskError's text is a traceback; the user message is its last line.
            last = text[-1] if text else ""
            for prefix in ("DivergenceError: ", "raysweep.train.DivergenceError: "):
                if prefix in last:
                    last = last.split(prefix, 1)[1]
            return f"DivergenceError: {last}"
    return None


def _exception_chain(err: BaseException, also: tuple[str, ...] = ()):
    """``err``, its causes and contexts, and the per-rank failures of a Ray Train error (and the
    exceptions held in the attributes named in ``also``)."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen or not isinstance(exc, BaseException):
            continue
        seen.add(id(exc))
        yield exc
        stack.extend([exc.__cause__, exc.__context__, getattr(exc, "cause", None)])
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend(getattr(exc, attr, None) for attr in also)


def worker_death_message(err: BaseException) -> str | None:
    """``"WorkerDied: ..."`` if a Train worker's process died, else None. Ray Train reports it as a
    failed health check of the rank, whose text holds Ray's ``ActorDiedError`` ("... its worker
    process has died. Worker exit type: ..."); the class may be the failure itself."""
    for exc in _exception_chain(err):
        failures = getattr(exc, "worker_failures", None)
        candidates = list(failures.items()) if isinstance(failures, dict) else [(None, exc)]
        for rank, failure in candidates:
            names = {cls.__name__ for cls in type(failure).__mro__}
            text = str(failure)
            if "ActorDiedError" in names or "worker process has died" in text or "actor died unexpectedly" in text:
                exit_type = re.search(r"Worker exit type: (\w+)", text)
                where = f"rank {rank}" if rank is not None else "a worker"
                return (f"WorkerDied: the Train worker process of {where} died mid-trial"
                        f"{f' (exit type {exit_type.group(1)})' if exit_type else ''}: killed (SIGKILL, the OOM "
                        "killer, a lost node) or crashed; see the trial's error.txt")
    return None


# ----------------------------------------------------------------------------- the Train rank


def resolve_worker(spec: str) -> Callable:
    """``module:function`` or ``/path/to/file.py:function`` -> the function."""
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"worker {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        name = "raysweep_worker_" + path.stem
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load worker file {str(path)!r}")
        module = sys.modules.get(name)
        if module is None:
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up here
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        module = importlib.import_module(target)
    return getattr(module, attr)


def check_worker_env() -> None:
    """``$RAYSWEEP_WORKER``, if set, must load now (exit 2), not fail in every trial."""
    from raysweep.config import fail

    worker = os.environ.get(WORKER_ENV)
    try:
        if worker:
            resolve_worker(worker)
    except Exception as err:  # noqa: BLE001
        fail(WORKER_ENV, "", f"cannot load worker {worker!r}: {err}")


def _set_threads(cpus: float) -> None:
    threads = str(max(1, int(cpus)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    try:
        import torch

        torch.set_num_threads(int(threads))
    except Exception:  # noqa: BLE001 - a worker without torch still runs
        pass


def train_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the trial's TorchTrainer (runs on every rank)."""
    from raysweep.config import ExperimentConfig

    os.environ.update(loop_config.get("env") or {})
    use_gpu = bool(loop_config.get("use_gpu"))
    if not use_gpu:
        _set_threads(loop_config.get("cpus_per_worker", 1))
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    if cfg.training.output_dir is None:
        # Remote (s3://...) storage: save on the worker's disk; Ray uploads reported checkpoints.
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"output_dir": Path(tempfile.mkdtemp(prefix="raysweep-"))})})
    worker = resolve_worker(loop_config.get("worker") or DEFAULT_WORKER)
    worker(cfg, RayReporter(loop_config.get("tracking")), use_gpu=use_gpu)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float, str)):
            out[key] = value
        elif hasattr(value, "item"):  # numpy / torch scalars
            try:
                out[key] = value.item()
            except (TypeError, ValueError):
                pass
    return out


class RayReporter:
    """The ``reporter`` handed to the worker: ``ray.train.report`` once per epoch, every rank.

    With ``tracking`` (see :func:`run_trial`), rank 0 also logs the epoch's generations table
    (``report.samples``) on the trial's MLflow run, before reporting: ASHA may stop the trial as
    soon as the report reaches Tune.
    """

    def __init__(self, tracking: dict[str, Any] | None = None) -> None:
        import ray.train

        self._rank = ray.train.get_context().get_world_rank()
        self._best = -math.inf  # objective_best: the best objective reported so far
        self._generations = None
        if tracking and self._rank == 0 and tracking.get("log_generations", True):
            try:
                from raysweep.sweep.generations import GenerationLogger

                self._generations = GenerationLogger(tracking)
            except Exception as err:  # noqa: BLE001 - tracking never fails a trial
                print(f"warning: MLflow tracking: generations will not be logged ({err})", file=sys.stderr)

    def __call__(self, report: Any) -> None:
        import ray.train

        if isinstance(report, dict):
            metrics, checkpoint, epoch, samples = report, None, report.get("epoch"), None
        else:
            metrics, checkpoint, epoch = report.metrics, report.checkpoint, report.epoch
            samples = getattr(report, "samples", None)
        metrics = _scalar_metrics(dict(metrics))
        if epoch is not None:
            metrics.setdefault("epoch", int(epoch))
        objective = metrics.get("objective")
        if not isinstance(objective, (int, float)) or isinstance(objective, bool):
            # ASHA and Optuna act on it: a worker must report it (raysweep.eval.metrics.objective).
            raise ValueError(f"the worker reported no numeric 'objective' at epoch {epoch}; "
                             f"metrics: {sorted(metrics)}")
        if not math.isfinite(objective):
            # Never hand ASHA/Optuna a made-up number: the trial fails, with the reason.
            raise ValueError(f"objective is {objective} at epoch {epoch}; metrics: {metrics}")
        # What search.scheduler.metric: best_so_far compares at a rung (raysweep.sweep.schedule).
        self._best = max(self._best, float(objective))
        metrics["objective_best"] = self._best
        if self._generations is not None and samples:
            step = result_step(metrics)
            if step is not None:
                self._generations.log(step, samples, continual="step" in metrics)
        if self._rank == 0 and checkpoint:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                checkpoint_dir_name=f"checkpoint_epoch_{int(epoch or 0):04d}",
                delete_local_checkpoint_after_upload=True,
            )
        else:
            ray.train.report(metrics)
