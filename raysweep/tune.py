"""``python -m raysweep.tune``: a Ray Tune sweep over unlearning methods and hyperparameters.

::

    python -m raysweep.tune --space search_spaces/tiny.yaml [--num-samples N] [--max-concurrent K]
        [--storage DIR] [--name NAME] [--resume] [--address auto|HOST:PORT] [--mlflow-uri URI]
        [--dry-run] [--verbose] [--set KEY=VALUE ...]

``main`` runs three phases: :func:`prepare` (1), :func:`fit` (2, 3) and :func:`finish` (4).
This module is the command only; the sweep's parts are in :mod:`raysweep.sweep`.

1. The YAML is validated completely (``raysweep.config.load_or_exit``; ``--num-samples``,
   ``--max-concurrent`` and ``--mlflow-uri`` are applied as ``--set`` overrides), then the
   machine-dependent checks (:func:`raysweep.sweep.cluster.preflight`) and the data and model
   checks. Any problem: one line on stderr naming the file (or flag) and key, exit 2, no Ray.
2. Ray: a local instance (``resources={"trial_driver": K}``) or, with ``--address`` /
   ``RAY_ADDRESS``, an existing cluster whose nodes declare the ``trial_driver`` resource.
3. Tune: ``OptunaSearch`` (TPE, seeded) over a define-by-run space
   (:class:`raysweep.sweep.space.SpaceBuilder`), the paper's defaults of each method enqueued
   first, ``ConcurrencyLimiter(max_concurrent)``, ASHA on ``objective`` per reported epoch
   (``training_iteration``) or no scheduler. One trial is ``raysweep.sweep.trial.run_trial`` (a
   Ray Train job per trial).
4. At the end: a results table sorted by objective, ``best.json`` and ``trials.json`` in the
   experiment directory ``<storage>/<name>``, the report (``report.md``, ``mu_fe.png``,
   ``objective_history.png``, ``steps.png`` for continual sweeps; :mod:`raysweep.sweep.report`), and
   the MLflow runs closed. Exit 0 if at least one trial finished, 1 if all failed, 130 if the
   sweep was interrupted (resume it with ``--resume``). ``--dry-run`` stops after 1: it prints
   the plan and its estimated cost (:mod:`raysweep.sweep.plan`) and exits 0 or 2.

The console (:mod:`raysweep.sweep.console`): a header, one line per trial event, a progress line
and the results table; Ray's logs, the workers' output and every metric go to
``<storage>/<name>/raysweep.log``. ``--verbose`` prints all of it on the console too, with
Tune's status table.

MLflow (:mod:`raysweep.sweep.tracking`): one parent run per sweep (created before Ray starts; an
unusable store exits 2), one child run per trial. Objective: ``(MU + FE) / 2``, maximised; with
``search.objective: pareto`` Optuna optimises ``[MU, FE]`` and ASHA still stops on ``objective``.

The experiment directory ``<storage>/<name>`` (:mod:`raysweep.sweep.summary`) must be shared by
all nodes on a multi-node cluster (NFS path or ``s3://...``).

Environment: ``RAYSWEEP_WORKER`` (the worker function, :mod:`raysweep.sweep.trial`),
``RAYSWEEP_NUM_CPUS`` / ``RAYSWEEP_OBJECT_STORE_MB`` (local Ray only); every ``RAYSWEEP_*``
variable of the driver (e.g. ``RAYSWEEP_CACHE``) is set in the Train workers too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Any

from raysweep.config import SweepConfig, load_or_exit
from raysweep.sweep.cluster import preflight, start_ray
from raysweep.sweep.console import SweepLog, header, log_path
from raysweep.sweep.mlflow_store import resolve_tracking_uri
from raysweep.sweep.mlflow_ui import announce
from raysweep.sweep.results import ERRORED, FINISHED, RUN_FAILED, RUN_KILLED
from raysweep.sweep.space import SpaceBuilder, check_scheduler, trial_dirname  # noqa: F401 - pickled here
from raysweep.sweep.storage import read_json, write_json
from raysweep.sweep.summary import best_lines, best_record, results_table, summarize, write_results
from raysweep.sweep.tracking import open_tracker
from raysweep.sweep.trial import WORKER_ENV, check_worker_env
from raysweep.sweep.tuner import make_tuner

# Names of this module before the sweep layer moved (Tune pickled SpaceBuilder and trial_dirname).
from raysweep.sweep.cluster import DEFAULT_STORAGE, _gpu_count, trial_fits, worker_bundle  # noqa: E402,F401
from raysweep.sweep.results import error_reason  # noqa: E402,F401
from raysweep.sweep.space import METRIC_COLUMNS, PARAMETER_COLUMNS, uses_beta  # noqa: E402,F401
from raysweep.sweep.summary import sweep_pareto_front as pareto_front  # noqa: E402,F401
from raysweep.sweep.tracking import tune_callbacks  # noqa: E402,F401

SWEEP_FILE = "sweep.json"  # the validated configuration, saved for --resume


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
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything (data, models, storage, MLflow, fit), print the plan and its estimated cost, start no trial")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's logs, the workers' output and Tune's status table on the console too "
                             "(by default they go to <storage>/<name>/raysweep.log)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set search.scheduler.type=none")
    return parser.parse_args(argv)


@dataclass
class Prepared:
    """What :func:`prepare` settled, for :func:`fit` and :func:`finish`."""

    args: argparse.Namespace
    sweep: SweepConfig
    storage: str
    name: str
    address: str | None
    tracker: Any  # SweepTracker | NoTracker
    log: SweepLog | None = None  # the console and raysweep.log (started by prepare)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def resume_hint(self) -> str:
        return "python -m raysweep.tune " + shlex.join(
            ["--space", str(self.args.space), "--storage", self.storage, "--name", self.name, "--resume"]
            + [part for o in self.args.overrides for part in ("--set", o)])


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values plus the flags that are shorthands for YAML keys."""
    overrides = list(args.overrides)
    for flag, key in (("num_samples", "search.num_samples"), ("max_concurrent", "search.max_concurrent"),
                      ("mlflow_uri", "tracking.uri")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return overrides


def _settle_config(args: argparse.Namespace, sweep: SweepConfig, experiment_path: str) -> SweepConfig:
    """The configuration the sweep runs with: on ``--resume`` the one it started with
    (``sweep.json``), else the validated one, saved there. Its tracking URI is made absolute:
    Ray workers with another working directory and a later ``--resume`` write the same store."""
    sweep.tracking.uri = resolve_tracking_uri(sweep.tracking.uri)
    saved = f"{experiment_path}/{SWEEP_FILE}"
    if not args.resume:
        write_json(saved, sweep.model_dump(mode="json"), mkdir=True)
        return sweep
    original = read_json(saved)
    if original is None:
        return sweep
    original_sweep = SweepConfig.model_validate(original)
    original_sweep.tracking.uri = resolve_tracking_uri(original_sweep.tracking.uri)
    if original_sweep != sweep:
        print(f"note: resuming with the configuration saved in {saved}, not {args.space}", file=sys.stderr)
    return original_sweep


def claim(args: argparse.Namespace, storage: str, name: str) -> str:
    """Lock ``storage/name`` for this sweep (two sweeps started together in one directory):
    a generated name moves on to ``-2``, ``-3``, ... when another sweep holds it; ``--name`` and
    ``--resume`` of a directory a live sweep holds exit 2."""
    from raysweep.config import fail
    from raysweep.sweep.storage import ExperimentBusy, claim_experiment

    try:
        return claim_experiment(storage, name, rename=args.name is None and not args.resume)
    except ExperimentBusy as err:
        fail("--resume" if args.resume else "--name", "", f"{err}; wait for it or choose another --name")


def prepare(args: argparse.Namespace) -> Prepared | int:
    """Phase 1: everything that can fail before Ray starts (exit 2 with one line), then the
    embedded default built and the MLflow parent run opened. With ``--dry-run``: the exit code
    of the printed plan instead (nothing built, no run opened)."""
    sweep = load_or_exit(args.space, _overrides(args))
    check_scheduler(sweep, args.space)
    check_worker_env()
    storage, name, address = preflight(args, sweep)
    if not args.resume:
        from raysweep.scenarios import preflight_data

        preflight_data(sweep.experiment)  # bad data files: exit 2 before Ray starts
    if not os.environ.get(WORKER_ENV):  # a replacement worker (as in the tests) loads its own models
        from raysweep.sweep.modelcheck import check_models_or_exit

        check_models_or_exit(sweep, args.space, address)  # every model resolves: here, then on one worker node
    if args.dry_run:
        from raysweep.sweep.plan import dry_run

        return dry_run(sweep, args.space, storage, name, address)  # the plan printed; its exit code
    name = claim(args, storage, name)  # this process's own experiment directory, locked until it exits
    if not os.environ.get(WORKER_ENV):
        from raysweep.scenarios import ensure_embedded_for

        # Build (or find) the embedded default here, with every core, rather than in the first
        # trial while the others wait on its lock. (A replacement worker, as in the tests, may
        # not need it.)
        ensure_embedded_for(sweep.experiment)
    sweep = _settle_config(args, sweep, f"{storage}/{name}")
    log = SweepLog(log_path(f"{storage}/{name}", name), verbose=args.verbose).start()
    flag_file = "--mlflow-uri" if args.mlflow_uri else None  # who an unusable store is blamed on
    try:
        tracker = open_tracker(sweep, f"{storage}/{name}", args.resume, flag_file=flag_file, space_file=args.space)
    except BaseException:
        log.close()
        raise
    print(header(name, f"{storage}/{name}", args.space, sweep, tracker, log.path, args.verbose), flush=True)
    return Prepared(args, sweep, storage, name, address, tracker, log)


def fit(p: Prepared) -> None:
    """Phase 2: Ray started (or joined), the trials run by Tune.

    Ctrl-C: Tune handles the first SIGINT while ``tuner.fit()`` runs (it stops the trials, saves
    the experiment state and returns; :func:`finish` then ends the MLflow runs KILLED and prints
    the resume command). Its own copy of Ray's hint, ``Tuner.restore(...)``, is not shown: the
    command to resume is ours. A second SIGINT raises ``KeyboardInterrupt``, which
    :func:`stop_now` turns into an immediate exit."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic CLIReporter table with our columns
    import ray

    logging.getLogger("ray.tune.tune").addFilter(_drop_tuner_restore_hint)
    try:
        start_ray(p.sweep, p.address)
        if p.log is not None:
            p.log.attach_workers()  # the workers' output into raysweep.log (and off the console)
        tuner = make_tuner(p.sweep, p.storage, p.name, p.tracker.trial_info(), p.args.resume, verbose=p.args.verbose)
        if p.args.resume:
            print(f"Resuming {p.experiment_path}", flush=True)
            if p.args.num_samples is not None or p.args.max_concurrent is not None:
                print("note: --num-samples/--max-concurrent are fixed by the original run on --resume",
                      file=sys.stderr)
        else:
            print(f"Experiment {p.experiment_path}\n(to resume if interrupted: {p.resume_hint})", flush=True)
        tuner.fit()
    except KeyboardInterrupt:
        raise  # main -> stop_now, which exits at once
    except BaseException as err:
        # Nothing of this sweep stays RUNNING in MLflow (a crash: FAILED, an exit: KILLED).
        p.tracker.abort(RUN_FAILED if isinstance(err, Exception) else RUN_KILLED)
        ray.shutdown()
        raise
    ray.shutdown()


def _drop_tuner_restore_hint(record: logging.LogRecord) -> bool:
    """Logging filter: Ray Tune's "Resume experiment with: Tuner.restore(...)" (Python API) line."""
    return "Tuner.restore(" not in record.getMessage()


def stop_now(p: Prepared | None) -> int:
    """A second Ctrl-C (or one before Tune handles SIGINT): exit at once, with 130.

    The MLflow runs still RUNNING are ended KILLED (a few quick writes; a run this cannot reach is
    reconciled by the next ``--resume``), Ray is shut down without waiting for the trials to stop
    (a local instance's processes are killed; a cluster ends the actors of a driver that is
    gone), and the resume command is printed. A third Ctrl-C ends the process at once."""
    import ray

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    print("\nInterrupted: exiting now, without waiting for the trials to stop.", file=sys.stderr, flush=True)
    if p is not None:
        p.tracker.abort(RUN_KILLED)
    ray.shutdown()
    if p is not None:
        print(f"The experiment state saved last is kept. Resume with:\n  {p.resume_hint}", file=sys.stderr)
    if p is not None and p.log is not None:
        p.log.close()  # os._exit below skips main's finally
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # not the interpreter's exit: no atexit hook of Ray or MLflow to wait for


def finish(p: Prepared) -> int:
    """Phase 3: results table, ``trials.json``, ``best.json``, the report, MLflow closed; the exit
    code (0 a result, 1 every trial failed, 130 interrupted)."""
    path = p.experiment_path
    summaries = summarize(path)
    print("\nResults (sorted by objective at each trial's best epoch):")
    print(results_table(summaries))
    record = best_record(p.sweep, path, summaries)
    tracked = write_results(path, summaries, record)
    if record is not None:
        print("\n" + best_lines(record, path))
    report_files: list = []
    try:
        from raysweep.sweep.report import report_sweep

        report_files = report_sweep(summaries, record, path)
        print(f"Report: {path}/report.md (+ {len(report_files) - 1} plot(s))")
    except Exception as err:  # noqa: BLE001 - the sweep's results are in; the report is extra
        print(f"warning: the report could not be written: {type(err).__name__}: {err}", file=sys.stderr)
    unfinished = [s for s in summaries if s["status"] not in (FINISHED, ERRORED)]
    p.tracker.finalize(summaries, record, [*tracked, *report_files], interrupted=bool(unfinished))
    announce(p.tracker)  # the MLflow runs view's direct URL (+ its columns)
    if unfinished:
        print(f"\nThe sweep was interrupted ({len(unfinished)} trial(s) unfinished). Resume with:\n  {p.resume_hint}",
              file=sys.stderr)
        return 130
    if record is None:
        errors = sorted({s["error"] for s in summaries if s["error"]})
        print(f"error: all {len(summaries)} trial(s) failed; no result. Reasons: " + "; ".join(errors or ["none recorded"]),
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepared = prepare(args)
    except KeyboardInterrupt:  # nothing started yet that needs stopping
        print("\nInterrupted before the sweep started.", file=sys.stderr)
        return 130
    if isinstance(prepared, int):  # --dry-run
        return prepared
    try:
        fit(prepared)
        return finish(prepared)
    except KeyboardInterrupt:
        return stop_now(prepared)
    finally:
        if prepared.log is not None:
            prepared.log.close()


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: objects Tune pickles for --resume
    # (the search space, the trial name creator) must refer to an importable module.
    from raysweep.tune import main as _main

    sys.exit(_main())
