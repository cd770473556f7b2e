"""MLflow tracking of a sweep: one parent run per sweep, one nested child run per trial.

Who writes what (every writer goes through ``MlflowClient``; nothing here calls
``mlflow.set_experiment()`` or uses MLflow's global active run):

* **The Tune driver** (``raysweep.tune.main``) opens the sweep with :meth:`SweepTracker.start`:
  the MLflow experiment ``tracking.experiment`` (created if needed, artifacts next to a sqlite
  store) and the **parent run**: params = the YAML flattened (``experiment.*``, ``search.*``
  with ranges written as ``loguniform(0.0001, 0.003)``, the per-method search space as
  ``space.<method>.<key>``), the raysweep/ray/torch/mlflow/python versions and the git commit.
  Its id is written to ``<experiment dir>/mlflow.json``; ``--resume`` reads it back and reuses
  the same parent run. At the end :meth:`SweepTracker.finalize` reconciles every child run
  with Tune's final trial statuses (no run stays RUNNING), logs ``best.json``, ``trials.json``
  and the report (``report.md`` + plots) on the parent and ends it FINISHED (FAILED if every
  trial failed, KILLED if the sweep was interrupted).
* **The Tune callback** :class:`TrackingCallback` (in the driver process; pickled with the
  Tuner for ``--resume``, so it holds only strings and creates its client lazily) owns the
  child runs' lifecycle: ``on_trial_start`` gets-or-creates the child run of the trial (found by
  the tags ``raysweep.trial_id`` + ``mlflow.parentRunId``, so a retry or a resumed trial reuses
  its run; named ``<method>-<trial id>``; params = the sampled config) and sets it RUNNING.
  Tune calls ``on_trial_start`` before it submits the trial's function, so the run exists
  before the trial runs: there is a single creator and no race. ``on_trial_result`` logs the
  epoch's numeric metrics with ``step`` = the result's ``step`` (continual) or ``epoch``;
  ``on_trial_complete`` ends the run FINISHED (tag ``raysweep.early_stopped``) and
  ``on_trial_error`` FAILED (tag ``raysweep.error`` = the reason).
* **The Train worker of rank 0** (:class:`GenerationLogger`, used by
  ``raysweep.trial.RayReporter``) has the per-question samples the driver never sees: every
  epoch, before the metrics are reported (ASHA may stop the trial right after a report), it logs
  the table ``generations/epoch_NNN.json`` (``step_NNN`` in the continual scenario) with
  ``MlflowClient.log_table``: set, question, ground truth, generation and the per-sample metrics.
  It finds the child run by tag (the trial driver passes the trial id and the parent run id in
  the train loop config); MLflow is imported in a background thread while the model loads.
  (A trial ASHA stops may hold the table of one epoch more than its metrics: the worker
  evaluated it before the stop reached it.)

A trial restarted from scratch (a retry, or an unfinished trial after ``--resume``) reports its
first epochs again: each epoch is logged once, by the first attempt that reached it (metrics and
generations alike), so every child run has one point per epoch.

``tracking.redact_forget: true`` replaces the question, ground truth and generation of every
forget-set row (the evaluation set named ``forget``), and any text of another set that contains a
forget-set question or answer, by ``sha256:<first 16 hex digits>``. ``tracking.log_generations:
false`` logs no tables (the workers then never import MLflow).

Tracking failures during a sweep are warnings (the sweep goes on); an unusable store when the
sweep starts is an error before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

try:  # the Tune callback base class (Ray is a dependency; keep this module importable without it)
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001
    _TuneCallback = object  # type: ignore[assignment,misc]

RUN_FILE = "mlflow.json"  # <experiment dir>/mlflow.json: tracking URI, experiment id, parent run id
TAG_ROLE = "raysweep.role"  # "sweep" | "trial"
TAG_TRIAL = "raysweep.trial_id"
TAG_METHOD = "raysweep.method"
TAG_PATH = "raysweep.experiment_path"
TAG_EARLY = "raysweep.early_stopped"
TAG_ERROR = "raysweep.error"
TAG_STATUS = "raysweep.tune_status"
TAG_PARENT = "mlflow.parentRunId"
GENERATIONS_DIR = "generations"
FORGET_SET = "forget"
SAMPLE_TEXT = ("question", "ground_truth", "generation")
MIN_LEAK_LEN = 8  # forget strings at least this long are also searched inside other sets' texts
# Tune bookkeeping keys of a result: not metrics of the trial.
TUNE_KEYS = frozenset({
    "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "experiment_tag", "should_checkpoint", "checkpoint_dir_name", "config", "checkpoint_path",
})
TUNE_TO_MLFLOW = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}
_MAX_PARAM = 6000
_MAX_TAG = 8000


def _warn(message: str) -> None:
    print(f"warning: MLflow tracking: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- small helpers


def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """The tracking URI to use, with local paths made absolute.

    Precedence: ``uri`` (``--mlflow-uri`` / ``tracking.uri``) > ``$MLFLOW_TRACKING_URI`` >
    ``sqlite:///<cwd>/mlflow.db``. A relative sqlite path or plain directory is resolved against
    ``cwd`` (default: the current directory), so Ray workers with another working directory
    write the same store.
    """
    base = Path(cwd or os.getcwd()).resolve()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        if path.startswith("//"):
            return uri
        return (base / path).resolve().as_uri()
    if "://" not in uri:  # a plain directory: MLflow's file store
        return (base / uri).expanduser().resolve().as_uri()
    return uri


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/"):
            return Path(path).parent
    return None


def sanitize_key(name: str) -> str:
    """A metric/param name MLflow accepts: other characters become ``_``, no path tricks."""
    text = re.sub(r"[^/\w.\- :]", "_", str(name))
    text = re.sub(r"/+", "/", text).strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    text = "/".join(parts) or "_"
    return text[:250]


def redact_text(text: Any) -> str:
    return "sha256:" + hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:16]


def trial_run_name(method: str | None, trial_id: str) -> str:
    return f"{method}-{trial_id}" if method else str(trial_id)


def result_step(metrics: dict[str, Any]) -> int | None:
    """The MLflow step of one report: its ``step`` (continual) or ``epoch`` (or Tune's iteration)."""
    for key in ("step", "epoch", "training_iteration"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return None


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result (or history row), names sanitized for MLflow."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in TUNE_KEYS or key.startswith("config/"):
            continue
        if isinstance(value, bool):
            value = float(value)
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
            try:
                value = value.item()
            except (TypeError, ValueError):
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[sanitize_key(key)] = float(value)
    return out


def _render_range(value: dict[str, Any]) -> str | None:
    kinds = [k for k in ("loguniform", "uniform", "int", "choice") if value.get(k) is not None]
    if len(kinds) == 1 and set(value) <= {"loguniform", "uniform", "int", "choice"}:
        args = value[kinds[0]]
        return f"{kinds[0]}({', '.join(str(a) for a in args)})"
    return None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; ranges rendered as ``kind(low, high)``, lists as JSON."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        rendered = _render_range(data) if data else None
        if rendered is not None and prefix:
            out[prefix] = rendered
            return out
        if not data and prefix:
            out[prefix] = "{}"
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (list, tuple)):
        out[prefix] = json.dumps(list(data), default=str)
    else:
        out[prefix] = "None" if data is None else str(data)
    return out


def git_commit(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding raysweep, or ``(None, None)``."""
    root = Path(path or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for package in ("raysweep", "ray", "torch", "mlflow", "transformers", "deepspeed", "optuna"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package == "raysweep":
                from raysweep import __version__

                out[package] = __version__
    return out


def sweep_params(sweep: Any) -> dict[str, str]:
    """The parent run's params: the YAML flattened, the search-space summary, versions, git."""
    data = sweep.model_dump(mode="json", exclude_none=False)
    params = flatten({"experiment": data["experiment"], "search": data["search"], "tracking": data["tracking"]})
    # Range fields left as None by model_dump are noise: "search.space.lr.uniform" = "None".
    params = {k: v for k, v in params.items()
              if not (re.search(r"\.(loguniform|uniform|int|choice)$", k) and v == "None")}
    for method in sweep.search.methods:
        space = sweep.search.space_for(method).model_dump(mode="json", exclude_none=True)
        for key, value in flatten(space).items():
            params[f"space.{method}.{key}"] = value
    for package, version in versions().items():
        params[f"version.{package}"] = version
    commit, dirty = git_commit()
    if commit:
        params["git.commit"] = commit
        params["git.dirty"] = str(dirty)
    out: dict[str, str] = {}
    for key, value in params.items():
        out[sanitize_key(key)] = value if len(value) <= _MAX_PARAM else value[: _MAX_PARAM - 3] + "..."
    return out


def retrying(fn: Callable, *args: Any, tries: int = 6, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried a few times when a sqlite store is locked."""
    delay = 0.2
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            text = str(err).lower()
            if attempt == tries - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay)
            delay *= 2


_CLIENTS: dict[str, Any] = {}


def client_for(uri: str):
    """One ``MlflowClient`` per tracking URI and process."""
    client = _CLIENTS.get(uri)
    if client is None:
        from mlflow import MlflowClient

        client = _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return client


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    directory = _sqlite_dir(uri)
    if directory is not None:
        # MLflow's default for a sqlite store is ./mlruns of whichever process creates the
        # experiment; keep the artifacts next to the database instead.
        location = (directory / "mlruns" / re.sub(r"[^\w.-]", "_", name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another sweep created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def child_runs(client: Any, experiment_id: str, parent_id: str) -> list:
    """Every (not deleted) child run of the parent."""
    return _search_all(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_id}'")


def find_child(client: Any, experiment_id: str, parent_id: str, trial_id: str):
    runs = _search_all(client, experiment_id,
                       f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'")
    if not runs:
        return None
    return min(runs, key=lambda r: r.info.start_time or 0)  # the first, should a duplicate exist


def ensure_child_run(client: Any, experiment_id: str, parent_id: str, trial_id: str,
                     params: dict[str, Any], experiment_path: str | None = None, running: bool = True):
    """The trial's child run, created (with its params) if it does not exist yet; ``(run, created)``."""
    run = find_child(client, experiment_id, parent_id, trial_id)
    if run is not None:
        if running and run.info.status != "RUNNING":
            retrying(client.update_run, run.info.run_id, "RUNNING")
        return run, False
    method = params.get("method")
    tags = {TAG_PARENT: parent_id, TAG_TRIAL: str(trial_id), TAG_ROLE: "trial"}
    if method:
        tags[TAG_METHOD] = str(method)
    if experiment_path:
        tags[TAG_PATH] = str(experiment_path)
    run = retrying(client.create_run, experiment_id, run_name=trial_run_name(method, trial_id), tags=tags)
    from mlflow.entities import Param

    log = [Param(sanitize_key(k), str(v)) for k, v in params.items()]
    if log:
        retrying(client.log_batch, run.info.run_id, params=log)
    return run, True


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int | None,
                timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, v, ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        retrying(client.log_batch, run_id, metrics=items[i:i + 1000])


def logged_steps(client: Any, run_id: str, key: str = "objective") -> set[int]:
    try:
        return {m.step for m in client.get_metric_history(run_id, key)}
    except Exception:  # noqa: BLE001
        return set()


def _read_run_file(experiment_path: str) -> dict[str, Any] | None:
    from raysweep.tune import read_json

    data = read_json(f"{experiment_path.rstrip('/')}/{RUN_FILE}")
    return data if isinstance(data, dict) and data.get("parent_run_id") else None


def _tag_value(text: str) -> str:
    text = str(text)
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 3] + "..."


# ----------------------------------------------------------------------------- generations


def generation_rows(samples: dict[str, list[dict]], redact_forget: bool = False) -> list[dict[str, Any]]:
    """The generations table: one row per evaluated question, ``set`` first.

    With ``redact_forget`` every text of the forget set, and any text of another set that
    contains a forget-set question or answer, is replaced by its hash (:func:`redact_text`).
    """
    forget_texts: set[str] = set()
    if redact_forget:
        for name, rows in samples.items():
            if _is_forget_set(name):
                for row in rows:
                    for key in ("question", "ground_truth"):
                        if row.get(key):
                            forget_texts.add(str(row[key]))
    long_texts = [t for t in forget_texts if len(t) >= MIN_LEAK_LEN]
    table = []
    for name, rows in samples.items():
        forget = _is_forget_set(name)
        for row in rows:
            out: dict[str, Any] = {"set": name}
            for key, value in row.items():
                if hasattr(value, "item") and not isinstance(value, (str, bytes)):
                    try:
                        value = value.item()
                    except (TypeError, ValueError):
                        value = str(value)
                if isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value, default=str)
                if redact_forget and isinstance(value, str) and (
                    (forget and key in SAMPLE_TEXT)
                    or value in forget_texts
                    or any(t in value for t in long_texts)
                ):
                    value = redact_text(value)
                out[key] = value
            table.append(out)
    return table


def _is_forget_set(name: str) -> bool:
    return name == FORGET_SET or name.startswith(FORGET_SET)


def generations_file(step: int, continual: bool = False) -> str:
    return f"{GENERATIONS_DIR}/{'step' if continual else 'epoch'}_{int(step):03d}.json"


class GenerationLogger:
    """Rank 0's per-epoch generations table on the trial's child run (see the module doc).

    ``info``: ``uri``, ``experiment_id``, ``parent_run_id``, ``trial_id``, ``params``,
    ``redact_forget``. Connects in a background thread; every failure is a warning, never an
    error of the trial.
    """

    def __init__(self, info: dict[str, Any], wait_s: float = 300.0):
        self.info = dict(info)
        self.wait_s = wait_s
        self.client = None
        self.run_id: str | None = None
        self.existing: set[str] = set()
        self._failed = False
        self._thread = threading.Thread(target=self._connect, name="raysweep-mlflow", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            info = self.info
            client = client_for(info["uri"])
            run = None
            for _ in range(4):  # the driver's callback created it before the trial started
                run = find_child(client, info["experiment_id"], info["parent_run_id"], info["trial_id"])
                if run is not None:
                    break
                time.sleep(0.5)
            if run is None:
                run, _ = ensure_child_run(client, info["experiment_id"], info["parent_run_id"],
                                          info["trial_id"], info.get("params") or {},
                                          info.get("experiment_path"))
            self.run_id = run.info.run_id
            self.existing = {a.path for a in client.list_artifacts(self.run_id, GENERATIONS_DIR)}
            self.client = client
        except Exception as err:  # noqa: BLE001
            self._failed = True
            _warn(f"generations will not be logged ({type(err).__name__}: {err})")

    def log(self, step: int, samples: dict[str, list[dict]], continual: bool = False) -> str | None:
        """Log one epoch's table; returns its artifact path (None if skipped or failed)."""
        if not samples or self._failed:
            return None
        self._thread.join(self.wait_s)
        if self.client is None or self.run_id is None:
            return None
        path = generations_file(step, continual)
        if path in self.existing:  # logged by an earlier attempt of this trial
            return None
        try:
            rows = generation_rows(samples, bool(self.info.get("redact_forget")))
            if not rows:
                return None
            columns: list[str] = []
            for row in rows:
                columns += [k for k in row if k not in columns]
            data = {c: [row.get(c) for row in rows] for c in columns}
            retrying(self.client.log_table, self.run_id, data=data, artifact_file=path)
            self.existing.add(path)
            return path
        except Exception as err:  # noqa: BLE001
            _warn(f"could not log {path} ({type(err).__name__}: {err})")
            return None


# ----------------------------------------------------------------------------- the driver


class SweepTracker:
    """The parent run of one sweep (driver side): start / resume, finalize, abort."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, experiment_path: str,
                 redact_forget: bool = False, log_generations: bool = True, created: bool = False):
        self.created = created  # the parent run was created by this process (not resumed)
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.experiment_path = experiment_path
        self.redact_forget = redact_forget
        self.log_generations = log_generations

    @property
    def client(self):
        return client_for(self.uri)

    @classmethod
    def start(cls, sweep: Any, experiment_path: str, resume: bool = False) -> "SweepTracker":
        """Create the parent run (or, on ``--resume``, reopen the one in ``mlflow.json``)."""
        from raysweep.tune import write_json

        tracking = sweep.tracking
        uri = resolve_tracking_uri(tracking.uri)
        saved = _read_run_file(experiment_path) if resume else None
        if saved is not None:
            uri = saved.get("tracking_uri") or uri
        client = client_for(uri)
        parent = None
        if saved is not None:
            try:
                parent = client.get_run(saved["parent_run_id"])
                if parent.info.lifecycle_stage == "deleted":
                    parent = None
            except Exception:  # noqa: BLE001 - gone from the store
                parent = None
        if parent is None and resume:
            quoted = experiment_path.replace("\\", "\\\\").replace("'", "\\'")
            found = _search_all(client, get_or_create_experiment(client, tracking.experiment, uri),
                                f"tags.`{TAG_PATH}` = '{quoted}' and tags.`{TAG_ROLE}` = 'sweep'")
            parent = min(found, key=lambda r: r.info.start_time or 0) if found else None
        reused = parent is not None
        if parent is not None:
            experiment_id = parent.info.experiment_id
            if parent.info.status != "RUNNING":
                retrying(client.update_run, parent.info.run_id, "RUNNING")
        else:
            experiment_id = get_or_create_experiment(client, tracking.experiment, uri)
            commit, _ = git_commit()
            tags = {TAG_ROLE: "sweep", TAG_PATH: experiment_path, "mlflow.source.name": "raysweep.tune",
                    "mlflow.source.type": "LOCAL"}
            if commit:
                tags["mlflow.source.git.commit"] = commit
            parent = retrying(client.create_run, experiment_id, run_name=Path(experiment_path).name, tags=tags)
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in sweep_params(sweep).items()]
            for i in range(0, len(params), 100):
                retrying(client.log_batch, parent.info.run_id, params=params[i:i + 100])
        tracker = cls(uri, experiment_id, parent.info.run_id, experiment_path,
                      tracking.redact_forget, tracking.log_generations, created=saved is None and not reused)
        write_json(f"{experiment_path.rstrip('/')}/{RUN_FILE}", tracker.run_file(), mkdir=True)
        return tracker

    def run_file(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id}

    def trial_info(self) -> dict[str, Any]:
        """What a trial (and its rank-0 worker) needs to log generations."""
        return {**self.run_file(), "uri": self.uri, "experiment_path": self.experiment_path,
                "redact_forget": self.redact_forget, "log_generations": self.log_generations}

    def url(self) -> str:
        return f"experiment {self.experiment_id}, parent run {self.parent_run_id} in {self.uri}"

    # ------------------------------------------------------------------ end of the sweep

    def finalize(self, summaries: list[dict[str, Any]], record: dict[str, Any] | None,
                 files: list[str | Path] = (), interrupted: bool = False) -> None:
        """Children reconciled with Tune's statuses, parent artifacts and status."""
        client = self.client
        known: set[str] = set()
        for summary in summaries:
            known.add(str(summary["trial_id"]))
            try:
                self._finalize_child(client, summary)
            except Exception as err:  # noqa: BLE001
                _warn(f"trial {summary.get('trial_id')}: {type(err).__name__}: {err}")
        try:  # anything else left RUNNING (e.g. a trial Tune no longer lists)
            for run in child_runs(client, self.experiment_id, self.parent_run_id):
                if run.info.status == "RUNNING":
                    retrying(client.set_terminated, run.info.run_id, "KILLED")
        except Exception as err:  # noqa: BLE001
            _warn(f"sweeping leftover runs: {err}")
        parent = self.parent_run_id
        try:
            finished = [s for s in summaries if s["status"] == "TERMINATED"]
            metrics = {
                "trials_total": len(summaries),
                "trials_finished": len(finished),
                "trials_early_stopped": sum(bool(s.get("early_stopped")) for s in summaries),
                "trials_errored": sum(s["status"] == "ERROR" for s in summaries),
            }
            if record is not None:
                for key in ("objective", "MU", "FE"):
                    value = (record.get("metrics") or {}).get(key)
                    if isinstance(value, (int, float)):
                        metrics[f"best_{key}"] = float(value)
                retrying(client.set_tag, parent, "raysweep.best_trial_id", str(record.get("trial_id")))
            log_metrics(client, parent, metrics, step=0)
            best_so_far, n = None, 0
            for summary in summaries:  # in trial start order
                n += 1
                value = (summary.get("best") or {}).get("objective")
                if isinstance(value, (int, float)):
                    best_so_far = value if best_so_far is None else max(best_so_far, value)
                if best_so_far is not None:
                    log_metrics(client, parent, {"best_objective_so_far": float(best_so_far)}, step=n)
        except Exception as err:  # noqa: BLE001
            _warn(f"parent metrics: {err}")
        for file in files:
            try:
                path = Path(file)
                if path.is_file():
                    retrying(client.log_artifact, parent, str(path),
                             None if path.suffix == ".json" else "report")
            except Exception as err:  # noqa: BLE001
                _warn(f"artifact {file}: {err}")
        status = "KILLED" if interrupted else ("FINISHED" if record is not None else "FAILED")
        try:
            retrying(client.set_terminated, parent, status)
        except Exception as err:  # noqa: BLE001
            _warn(f"parent status: {err}")

    def _finalize_child(self, client: Any, summary: dict[str, Any]) -> None:
        status = summary["status"]
        trial_id = str(summary["trial_id"])
        run = find_child(client, self.experiment_id, self.parent_run_id, trial_id)
        if run is None:
            if status not in TUNE_TO_MLFLOW:
                return  # never started (interrupted sweep): no run to show
            run, _ = ensure_child_run(client, self.experiment_id, self.parent_run_id, trial_id,
                                      summary.get("params") or {}, self.experiment_path, running=False)
        run_id = run.info.run_id
        # Back-fill epochs Tune recorded but the callback did not log (e.g. a killed driver).
        steps = logged_steps(client, run_id)
        for row in summary.get("history") or []:
            step = result_step(row)
            if step is not None and step not in steps:
                log_metrics(client, run_id, numeric_metrics(row), step)
                steps.add(step)
        retrying(client.set_tag, run_id, TAG_STATUS, status)
        if status == "TERMINATED":
            retrying(client.set_tag, run_id, TAG_EARLY, str(bool(summary.get("early_stopped"))).lower())
            if TAG_ERROR in run.data.tags:
                retrying(client.delete_tag, run_id, TAG_ERROR)
            if run.info.status != "FINISHED":
                retrying(client.set_terminated, run_id, "FINISHED")
        elif status == "ERROR":
            retrying(client.set_tag, run_id, TAG_ERROR, _tag_value(summary.get("error") or "errored"))
            if run.info.status != "FAILED":
                retrying(client.set_terminated, run_id, "FAILED")
        elif run.info.status == "RUNNING":
            retrying(client.set_terminated, run_id, "KILLED")

    def abort(self, status: str = "FAILED") -> None:
        """The driver is going down with an exception: nothing of this sweep stays RUNNING.

        A parent run this process created and no trial ever reached (e.g. Ray could not start)
        is deleted instead of being left as an empty FAILED run.
        """
        try:
            client = self.client
            children = child_runs(client, self.experiment_id, self.parent_run_id)
            if self.created and not children:
                client.delete_run(self.parent_run_id)
                return
            for run in children:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, "KILLED")
            client.set_terminated(self.parent_run_id, status)
        except Exception as err:  # noqa: BLE001
            _warn(f"abort: {err}")


# ----------------------------------------------------------------------------- the Tune callback


class NoTracker:
    """``tracking.enabled: false``: the driver's tracker interface, recording nothing."""

    def trial_info(self) -> None:
        return None

    def url(self) -> str:
        return "off (tracking.enabled: false); results are in the experiment directory only"

    def finalize(self, *args: Any, **kwargs: Any) -> None:
        return None

    def abort(self, status: str = "FAILED") -> None:  # noqa: ARG002
        return None


class TrackingCallback(_TuneCallback):
    """Tune callback: the child run of every trial (see the module doc).

    Pickled with the Tuner (``--resume`` restores it): it keeps strings only; the client and the
    caches are rebuilt lazily in whichever process uses it. The parent run id is re-read from
    ``<experiment dir>/mlflow.json`` when the sweep starts (``setup``), which ``SweepTracker``
    writes before the Tuner runs.
    """

    def __init__(self, experiment_path: str, uri: str | None = None, parent_run_id: str | None = None,
                 experiment_id: str | None = None):
        self.experiment_path = str(experiment_path)
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self._runs: dict[str, str] = {}
        self._steps: dict[str, set[int]] = {}
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runs"], state["_steps"], state["_warned"] = {}, {}, False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ helpers

    def _load(self) -> bool:
        saved = _read_run_file(self.experiment_path)
        if saved is not None:
            self.uri = saved.get("tracking_uri") or self.uri
            self.parent_run_id = saved["parent_run_id"]
            self.experiment_id = saved.get("experiment_id") or self.experiment_id
        return bool(self.uri and self.parent_run_id and self.experiment_id)

    def _ready(self) -> bool:
        if self.uri and self.parent_run_id and self.experiment_id:
            return True
        return self._load()

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            if not self._ready():
                if not self._warned:
                    _warn(f"no parent run found in {self.experiment_path}/{RUN_FILE}; trials are not tracked")
                    self._warned = True
                return
            fn()
        except Exception as err:  # noqa: BLE001 - tracking never stops the sweep
            _warn(f"{what}: {type(err).__name__}: {err}")

    def _run_id(self, trial: Any, running: bool = True) -> str:
        trial_id = str(trial.trial_id)
        run_id = self._runs.get(trial_id)
        if run_id is None:
            from raysweep.trial import sampled_params

            client = client_for(self.uri)
            run, created = ensure_child_run(client, self.experiment_id, self.parent_run_id, trial_id,
                                            sampled_params(trial.config or {}), self.experiment_path,
                                            running=running)
            run_id = self._runs[trial_id] = run.info.run_id
            self._steps[trial_id] = set() if created else logged_steps(client, run_id)
        return run_id

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:  # noqa: ARG002
        try:
            self._load()
        except Exception as err:  # noqa: BLE001
            _warn(f"setup: {err}")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        def start():
            trial_id = str(trial.trial_id)
            self._runs.pop(trial_id, None)  # (re)started: re-read the run and its logged epochs
            self._run_id(trial, running=True)

        self._guard(f"trial {trial.trial_id} start", start)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:  # noqa: ARG002
        def log():
            run_id = self._run_id(trial)
            step = result_step(result)
            steps = self._steps.setdefault(str(trial.trial_id), set())
            if step is None or step in steps:
                return  # this epoch was logged by an earlier attempt of the trial
            metrics = numeric_metrics(result)
            if metrics:
                log_metrics(client_for(self.uri), run_id, metrics, step)
            steps.add(step)

        self._guard(f"trial {trial.trial_id} result", log)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        def complete():
            client = client_for(self.uri)
            run_id = self._run_id(trial, running=False)
            last = trial.last_result or {}
            from raysweep.trial import sampled_params

            planned, epoch = sampled_params(trial.config or {}).get("epochs"), last.get("epoch")
            early = (isinstance(planned, (int, float)) and isinstance(epoch, (int, float))
                     and int(epoch) < int(planned))
            retrying(client.set_tag, run_id, TAG_EARLY, str(bool(early)).lower())
            retrying(client.set_tag, run_id, TAG_STATUS, "TERMINATED")
            retrying(client.set_terminated, run_id, "FINISHED")

        self._guard(f"trial {trial.trial_id} end", complete)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        def error():
            from raysweep.tune import _read_text, error_reason

            client = client_for(self.uri)
            run_id = self._run_id(trial, running=False)
            reason = None
            try:
                reason = error_reason(_read_text(trial.error_file))
            except Exception:  # noqa: BLE001
                pass
            retrying(client.set_tag, run_id, TAG_ERROR, _tag_value(reason or "errored"))
            retrying(client.set_tag, run_id, TAG_STATUS, "ERROR")
            retrying(client.set_terminated, run_id, "FAILED")

        self._guard(f"trial {trial.trial_id} error", error)


def tune_callback(sweep: Any, experiment_path: str) -> TrackingCallback:
    saved = None
    try:
        saved = _read_run_file(experiment_path)
    except Exception:  # noqa: BLE001
        pass
    saved = saved or {}
    return TrackingCallback(experiment_path, uri=saved.get("tracking_uri") or resolve_tracking_uri(sweep.tracking.uri),
                            parent_run_id=saved.get("parent_run_id"), experiment_id=saved.get("experiment_id"))


__all__ = [
    "GenerationLogger", "NoTracker", "SweepTracker", "TrackingCallback", "generation_rows", "redact_text",
    "resolve_tracking_uri", "sanitize_key", "tune_callback",
]
