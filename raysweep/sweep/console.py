"""What a person sees in the terminal during a sweep, and the log file that keeps the rest.

By default the terminal shows (``python -m raysweep.tune``):

* a short header (:func:`header`): the experiment, its directory, the log file, MLflow and the
  UI's runs view;
* one line per trial event (:class:`ConsoleCallback`, a Tune callback): started with its
  parameters, each epoch (or continual step) with objective / MU / FE, stopped early by the
  scheduler, finished, retried, errored with the one-line reason;
* a progress line whenever the counts or the best trial change (and at least every
  :data:`HEARTBEAT_S` seconds): trials done / running / pending, the best so far, the time spent;
* the final results table (``raysweep.tune.finish``).

Everything else goes to ``<experiment dir>/raysweep.log`` (:class:`SweepLog`): the driver's
``ray`` logger (Ray's and Tune's INFO/WARNING lines) and those of MLflow and Optuna, Python
warnings, the stdout/stderr of
every Ray worker (trial drivers, Train controllers and workers; Ray forwards them to the driver,
where :meth:`SweepLog.attach_workers` takes them instead of Ray's printer), every metric each
trial reports, and the console's own lines. Errors stay visible: those loggers' ERROR records
(first line) and the workers' own ``warning:`` / ``error:`` lines (each distinct one once) are
also printed on stderr; an errored trial's reason is its console line.

``--verbose`` (``SweepLog(verbose=True)``; ``raysweep.sweep.tuner.make_tuner(verbose=True)``)
keeps Ray's console output as it is — Tune's status table (``CLIReporter``) every 10 s, its
``Trial … reported …`` line per result (``TrialProgressCallback``, Tune ``verbose=2``), the
workers' output — and adds the console's lines; the log file is written all the same.

What Tune prints is decided by its ``verbose`` and the old output engine
(``RAY_AIR_NEW_OUTPUT=0``, set by ``raysweep.tune.fit``): ``verbose >= 1`` reports the status
table through the progress reporter and ``verbose >= 2`` makes the ``TrialProgressCallback``
(added to every run) print one line per result. ``verbose=0`` prints neither; this module's
callback is then the console.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from raysweep.sweep.mlflow_ui import runs_url, ui_base, ui_command
from raysweep.sweep.results import ERRORED, FINISHED, early_stopped, error_reason, result_step, sampled_params
from raysweep.sweep.space import PARAMETER_COLUMNS
from raysweep.sweep.storage import is_remote

try:  # the Tune callback base class (Ray is a dependency; keep this module importable without it)
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001
    _TuneCallback = object  # type: ignore[assignment,misc]

LOG_FILE = "raysweep.log"
EVENTS = "raysweep.console"  # the console's lines (terminal + log file)
METRICS = "raysweep.metrics"  # every metric of every result (log file only)
HEARTBEAT_S = 60.0  # the progress line at least this often while trials run
PARAM_NAMES = {**PARAMETER_COLUMNS, "reg_coeff": "γ", "lora_r": "lora_r"}
WORKER_ECHO = ("warning:", "error:")  # raysweep's own stderr convention, shown once on the console
# Libraries whose loggers print on the driver's console: Ray (and Tune, Train), MLflow and its
# database migrations, Optuna. Without --verbose their records go to the log file, errors also
# to stderr (first line) but for those the console says itself: a failed trial.
LIBRARY_LOGGERS = {"ray": "Ray", "mlflow": "MLflow", "alembic": "MLflow database", "optuna": "Optuna"}
SAID_BY_THE_CONSOLE = ("Trial task failed for trial", "Trials did not complete")
_WORKER_HANDLER = "raysweep_log"  # our handler on Ray's worker stdout/stderr dispatcher
_RAY_PRINTER = "ray_print_logs"  # Ray's own (ray._private.worker.connect)


def log_path(experiment_path: str, name: str) -> str:
    """``<experiment dir>/raysweep.log``; for remote storage (``s3://…``) a local file in the
    system's temporary directory, since the log is appended line by line."""
    if is_remote(experiment_path):
        import tempfile

        return str(Path(tempfile.gettempdir()) / f"raysweep-{name}.log")
    return str(Path(experiment_path) / LOG_FILE)


def header(name: str, experiment_path: str, space_file: str, sweep: Any, tracker: Any, log_file: str,
           verbose: bool) -> str:
    """The lines printed before Ray starts: what runs, where its results and logs go, where to
    watch it in MLflow (``tracker``: a ``SweepTracker`` or ``NoTracker``)."""
    search = sweep.search
    trials = "every grid point" if search.algorithm == "grid" else f"{search.num_samples} trial(s)"
    scheduler = search.scheduler.type
    lines = [
        f"Sweep {name} ({space_file}): {trials} of {', '.join(search.methods)}, "
        f"{search.max_concurrent} at a time, {search.algorithm}"
        + (f" + {scheduler.upper()} early stopping" if scheduler != "none" else ""),
        f"  experiment dir: {experiment_path}",
        f"  log file:       {log_file}"
        + ("" if verbose else "  (Ray's logs, worker output, every metric; --verbose prints them here)"),
        f"  MLflow: {tracker.url()}",
    ]
    uri, experiment_id = getattr(tracker, "uri", None), getattr(tracker, "experiment_id", None)
    if uri and experiment_id:
        lines.append(f"  MLflow UI:      {runs_url(ui_base(uri), experiment_id)}")
        command = ui_command(uri)
        if command:
            lines.append(f"                  (serve the store first: {command})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formatting


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def params_text(config: dict[str, Any]) -> str:
    """``NPO+GD lr=0.001 epochs=3 α=0.5 β=0.1`` from a trial config."""
    params = sampled_params(config)
    parts = [str(params.pop("method", "?"))]
    parts += [f"{PARAM_NAMES.get(k, k)}={_num(v)}" for k, v in params.items()]
    return " ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _last_failure(text: str | None) -> str | None:
    """The reason of the latest failure in a Tune ``error.txt`` (it appends one block per failure)."""
    if not text:
        return None
    return error_reason(text.rsplit("Failure # ", 1)[-1])


def _error_file(trial: Any) -> str | None:
    """Where the trial's ``error.txt`` is kept: its directory in the experiment directory (Tune
    writes it in a staging directory first and syncs it there)."""
    staged = getattr(trial, "error_file", None)
    path = getattr(trial, "path", None)
    return f"{path}/{Path(staged).name}" if staged and path else staged


def trial_error(trial: Any) -> str:
    """The one-line reason a trial failed, from its ``error.txt`` (written before the callbacks run)."""
    path = getattr(trial, "error_file", None)
    text = None
    if path:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = None
    return _last_failure(text) or f"no reason recorded{f' in {path}' if path else ''}"


# ----------------------------------------------------------------------------- the Tune callback


class ConsoleCallback(_TuneCallback):
    """Tune callback: one line per trial event and the progress line, on the :data:`EVENTS`
    logger (configured by :class:`SweepLog`); every reported metric on :data:`METRICS`.

    Pickled with the Tuner (``--resume`` restores it): it keeps only the scheduler's name and
    rebuilds its counters in :meth:`setup`."""

    def __init__(self, scheduler: str = "asha", heartbeat_s: float = HEARTBEAT_S):
        self.scheduler = scheduler
        self.heartbeat_s = heartbeat_s
        self._reset()

    def _reset(self) -> None:
        self._total: int | None = None
        self._start = time.time()
        self._best: tuple[float, str, str, str] | None = None  # objective, trial id, method, "epoch k"
        self._trial_best: dict[str, tuple[float, str]] = {}  # trial id -> its best (objective, "epoch k")
        self._last_state: tuple | None = None
        self._last_print = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "heartbeat_s": self.heartbeat_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @staticmethod
    def _say(message: str, level: int = logging.INFO) -> None:
        logging.getLogger(EVENTS).log(level, f"[{time.strftime('%H:%M:%S')}] {message}")

    # ------------------------------------------------------------------ Tune's hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._reset()
        self._total = total_num_samples

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._say(f"trial {trial.trial_id} started: {params_text(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        step = result_step(result)
        kind = "step" if "step" in result else "epoch"
        planned = sampled_params(trial.config).get("epochs") if kind == "epoch" else None
        position = f"{kind} {step}" + (f"/{planned}" if planned else "")
        objective = result.get("objective")
        self._say(f"trial {trial.trial_id} {position}: objective {_metric(objective)}  "
                  f"MU {_metric(result.get('MU'))}  FE {_metric(result.get('FE'))}")
        metrics = {k: v for k, v in result.items() if k != "config" and not k.startswith("config/")}
        logging.getLogger(METRICS).info(f"trial {trial.trial_id} {kind} {step}: {metrics}")
        if not isinstance(objective, (int, float)):
            return
        best = self._trial_best.get(str(trial.trial_id))
        if best is None or objective > best[0]:
            self._trial_best[str(trial.trial_id)] = (float(objective), f"{kind} {step}")
        if self._best is None or objective > self._best[0]:
            self._best = (float(objective), str(trial.trial_id), str(sampled_params(trial.config).get("method")),
                          f"{kind} {step}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        last = trial.last_result or {}
        params = sampled_params(trial.config)
        done = result_step(last)
        best = self._trial_best.get(str(trial.trial_id))
        best_text = f" (best objective {best[0]:.4f} at {best[1]})" if best else ""
        if early_stopped(FINISHED, params.get("epochs"), last):
            by = f" by {self.scheduler.upper()}" if self.scheduler != "none" else ""
            self._say(f"trial {trial.trial_id} stopped early{by} after epoch {done} of {params.get('epochs')}{best_text}")
        else:
            self._say(f"trial {trial.trial_id} finished after {'step' if 'step' in last else 'epoch'} {done}{best_text}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._say(f"trial {trial.trial_id} failed, retrying (failure {trial.num_failures}): {trial_error(trial)}",
                  logging.WARNING)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        where = f" (traceback: {_error_file(trial)})" if _error_file(trial) else ""
        self._say(f"trial {trial.trial_id} errored: {trial_error(trial)}{where}", logging.ERROR)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        state = self._state(trials)
        now = time.time()
        running = state[1] > 0
        if state != self._last_state or (running and now - self._last_print >= self.heartbeat_s):
            self._print_progress(state, now)

    def on_experiment_end(self, trials: list, **info) -> None:
        state = self._state(trials)
        if state != self._last_state:
            self._print_progress(state, time.time())

    # ------------------------------------------------------------------ the progress line

    def _state(self, trials: list) -> tuple:
        statuses = [t.status for t in trials]
        done = sum(s in (FINISHED, ERRORED) for s in statuses)
        running = sum(s == "RUNNING" for s in statuses)
        errored = sum(s == ERRORED for s in statuses)
        stopped = sum(t.status == FINISHED and early_stopped(FINISHED, sampled_params(t.config).get("epochs"),
                                                           t.last_result or {}) for t in trials)
        total = max(self._total or 0, len(trials))
        return done, running, total - done - running, errored, stopped, self._best

    def _print_progress(self, state: tuple, now: float) -> None:
        done, running, pending, errored, stopped, best = state
        total = done + running + pending
        notes = ", ".join(n for n in (f"{stopped} stopped early" if stopped else "",
                                      f"{errored} errored" if errored else "") if n)
        best_text = (f"best {best[0]:.4f} (trial {best[1]}, {best[2]}, {best[3]})" if best
                     else "best: none yet")
        self._say(f"progress: {done}/{total} done{f' ({notes})' if notes else ''} | {running} running | "
                  f"{pending} pending | {best_text} | {_duration(now - self._start)} elapsed")
        self._last_state, self._last_print = state, now


# ----------------------------------------------------------------------------- the log file


class _FileHandler(logging.StreamHandler):
    """Every record as ``time level logger: message`` (+ traceback) in the log file. ``format``
    is fixed here: ``ray.init`` overwrites the formatter of every handler of the ``ray`` logger."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return text


class _ConsoleLine(logging.StreamHandler):
    """A record as its message's first line, on the stream current at emit time (stdout or stderr)."""

    def __init__(self, stream_name: str, level: int, prefix: str = "", skip: tuple[str, ...] = ()):
        super().__init__()
        self.stream_name, self.prefix, self.skip = stream_name, prefix, skip
        self.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.skip):
            return
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines() or [""]
        more = " (more in the log file)" if len(lines) > 1 or record.exc_info else ""
        return f"{self.prefix}{lines[0]}{more}"


class SweepLog:
    """The sweep's log file and who writes where (see the module doc). :meth:`start` before Ray
    starts, :meth:`attach_workers` right after ``ray.init``, :meth:`close` at the end."""

    def __init__(self, path: str, verbose: bool = False):
        self.path = str(path)
        self.verbose = verbose
        self._file = None
        self._handler: logging.Handler | None = None
        self._installed: list[tuple[logging.Logger, logging.Handler]] = []
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._levels: list[tuple[logging.Logger, int, bool]] = []
        self._workers_attached = False
        self._ray_printers: list[tuple[str, Any]] = []
        self._echoed: set[str] = set()
        self._lock = threading.Lock()
        self._captured_warnings = False

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._installed.append((logger, handler))

    def _configure(self, name: str, level: int, propagate: bool = False) -> logging.Logger:
        logger = logging.getLogger(name)
        self._levels.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.propagate = propagate
        return logger

    def start(self) -> "SweepLog":
        # The libraries set up their console handlers on import (Ray, MLflow, and Alembic through
        # MLflow) or on their first record (Optuna): have them do it now, to rearrange them here.
        import mlflow  # noqa: F401
        import optuna
        import ray  # noqa: F401

        optuna.logging.get_verbosity()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._handler = _FileHandler(self._file)
        self._handler.setLevel(logging.DEBUG)

        events = self._configure(EVENTS, logging.INFO)
        self._add(events, self._handler)
        self._add(events, _ConsoleLine("stdout", logging.INFO))
        metrics = self._configure(METRICS, logging.INFO)
        self._add(metrics, self._handler)

        for name, label in LIBRARY_LOGGERS.items():
            logger = logging.getLogger(name)
            self._add(logger, self._handler)
            if self.verbose:
                continue
            for handler in list(logger.handlers):
                if handler is not self._handler:
                    logger.removeHandler(handler)
                    self._removed.append((logger, handler))
            self._add(logger, _ConsoleLine("stderr", logging.ERROR, prefix=f"{label}: ", skip=SAID_BY_THE_CONSOLE))
        if not self.verbose:
            logging.captureWarnings(True)
            self._captured_warnings = True
            self._add(self._configure("py.warnings", logging.WARNING), self._handler)
        return self

    def attach_workers(self) -> None:
        """Take the workers' stdout/stderr lines that Ray forwards to this driver: into the log
        file, and (without ``--verbose``) off the console but for raysweep's ``warning:`` /
        ``error:`` lines. Call after ``ray.init``."""
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # another Ray: its own printer stays, the log file has the driver's lines
            logging.getLogger(EVENTS).warning("note: worker output stays on the console (Ray's log dispatcher not found)")
            return
        dispatcher.add_handler(_WORKER_HANDLER, self._worker_lines)
        if not self.verbose:
            self._ray_printers = [pair for pair in dispatcher.handlers if pair[0] == _RAY_PRINTER]
            dispatcher.remove_handler(_RAY_PRINTER)
        self._workers_attached = True

    def _worker_lines(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
        stream = "stderr" if data.get("is_err") else "stdout"
        lines = [str(line) for line in data.get("lines", [])]
        with self._lock:
            if self._file is None:
                return
            for line in lines:
                self._file.write(f"{prefix} {stream}: {line}\n")
            echo = []
            if not self.verbose:
                for line in lines:
                    text = line.strip()
                    if text.startswith(WORKER_ECHO) and text not in self._echoed:
                        self._echoed.add(text)
                        echo.append(text)
        for text in echo:
            print(f"{prefix} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._workers_attached:
            try:
                from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

                dispatcher.remove_handler(_WORKER_HANDLER)
                for name, printer in self._ray_printers:  # Ray's printer back, for whatever runs next
                    dispatcher.add_handler(name, printer)
                self._ray_printers = []
            except ImportError:
                pass
            self._workers_attached = False
        for logger, handler in self._installed:
            logger.removeHandler(handler)
        for logger, handler in self._removed:
            logger.addHandler(handler)
        for logger, level, propagate in reversed(self._levels):
            logger.setLevel(level)
            logger.propagate = propagate
        self._installed, self._removed, self._levels = [], [], []
        if self._captured_warnings:
            logging.captureWarnings(False)
            self._captured_warnings = False
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


__all__ = ["ConsoleCallback", "LOG_FILE", "SweepLog", "header", "log_path", "params_text"]
