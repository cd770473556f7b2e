"""MLflow plumbing shared by the sweep's writers (the driver, the Tune callback, rank 0):
one ``MlflowClient`` per URI, retries on a locked sqlite store, the tags that tie a trial's
child run to its sweep's parent run, get-or-create of child runs, metric batches, and the
sweep's params flattened. Only ``MlflowClient`` is used, never MLflow's global state."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from raysweep.sweep.results import RUN_RUNNING, TUNE_KEYS
from raysweep.sweep.storage import read_json

RUN_FILE = "mlflow.json"  # <experiment dir>/mlflow.json: tracking URI, experiment id, parent run id
TAG_ROLE = "raysweep.role"  # "sweep" | "trial"
TAG_TRIAL = "raysweep.trial_id"
TAG_METHOD = "raysweep.method"
TAG_PATH = "raysweep.experiment_path"
TAG_EARLY = "raysweep.early_stopped"
TAG_ERROR = "raysweep.error"
TAG_STATUS = "raysweep.tune_status"
TAG_PARENT = "mlflow.parentRunId"
_MAX_PARAM = 6000
_MAX_TAG = 8000


def warn(message: str) -> None:
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



def trial_run_name(method: str | None, trial_id: str) -> str:
    return f"{method}-{trial_id}" if method else str(trial_id)


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
    root = Path(path or Path(__file__).resolve().parents[2])
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
    if sweep.search.scheduler.type == "asha":  # grace_period "auto" resolved (issue #16)
        from raysweep.sweep.schedule import grace_epochs
        from raysweep.sweep.space import SpaceBuilder

        max_t = sweep.search.scheduler.max_t or SpaceBuilder(sweep).max_epochs()
        params["search.scheduler.grace_epochs"] = str(grace_epochs(sweep, max_t))
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

        directory = _sqlite_dir(uri)
        if directory is None:
            client = MlflowClient(tracking_uri=uri)
        else:
            with _sqlite_init_lock(directory):
                client = MlflowClient(tracking_uri=uri)  # creates the tables of a new database
                _use_wal(uri[len("sqlite:///"):])
        _CLIENTS[uri] = client
    return client


@contextlib.contextmanager
def _sqlite_init_lock(directory: Path):
    """An exclusive ``flock`` next to a sqlite store while a client opens it: MLflow creates the
    tables of a new database on first open, and two sweeps started together on one new
    ``mlflow.db`` would otherwise both run those migrations (one fails: "table already exists")."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".mlflow-init.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _use_wal(path: str) -> None:
    """Switch the sqlite store to write-ahead logging (a property of the file, kept): readers --
    another sweep's, the MLflow UI -- no longer block a writer, so concurrent sweeps see far
    fewer "database is locked" errors (those left are retried, :func:`retrying`)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:  # e.g. a filesystem without shared memory: keep the default journal
        print(f"note: the MLflow store {path} stays in its default journal mode ({err})", file=sys.stderr)


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


def search_all(client: Any, experiment_id: str, filter_string: str) -> list:
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
    return search_all(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_id}'")


def find_child(client: Any, experiment_id: str, parent_id: str, trial_id: str):
    runs = search_all(client, experiment_id,
                       f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'")
    if not runs:
        return None
    return min(runs, key=lambda r: r.info.start_time or 0)  # the first, should a duplicate exist


def ensure_child_run(client: Any, experiment_id: str, parent_id: str, trial_id: str,
                     params: dict[str, Any], experiment_path: str | None = None, running: bool = True):
    """The trial's child run, created (with its params) if it does not exist yet; ``(run, created)``."""
    run = find_child(client, experiment_id, parent_id, trial_id)
    if run is not None:
        if running and run.info.status != RUN_RUNNING:
            retrying(client.update_run, run.info.run_id, RUN_RUNNING)
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


def read_run_file(experiment_path: str) -> dict[str, Any] | None:
    data = read_json(f"{experiment_path.rstrip('/')}/{RUN_FILE}")
    return data if isinstance(data, dict) and data.get("parent_run_id") else None


def tag_value(text: str) -> str:
    text = str(text)
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 3] + "..."

