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
  a result with ``eval/gather_fallback = 1`` (the ZeRO-3 weights did not fit for a gathered evaluation)
  tags the run ``raysweep.eval_weights = synced-fallback``;
  ``on_trial_complete`` ends the run FINISHED (tag ``raysweep.early_stopped``) and
  ``on_trial_error`` FAILED (tag ``raysweep.error`` = the reason).
* **The Train worker of rank 0** (:class:`raysweep.sweep.generations.GenerationLogger`, used by
  ``raysweep.sweep.trial.RayReporter``) has the per-question samples the driver never sees: every
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

from pathlib import Path
from typing import Any, Callable

from raysweep.sweep.mlflow_store import (
    RUN_FILE, TAG_EARLY, TAG_ERROR, TAG_PATH, TAG_ROLE, TAG_STATUS, child_runs, client_for, ensure_child_run,
    find_child, get_or_create_experiment, git_commit, log_metrics, logged_steps, numeric_metrics, read_run_file,
    resolve_tracking_uri, retrying, search_all, sweep_params, tag_value, warn,
)
from raysweep.sweep.results import (
    ERRORED, FINISHED, RUN_FAILED, RUN_FINISHED, RUN_KILLED, RUN_RUNNING, TUNE_TO_MLFLOW, early_stopped,
    error_reason, result_step, sampled_params,
)
from raysweep.sweep.storage import read_text, write_json

# raysweep.eval.gather: a trial whose evaluation fell back to the hooked ZeRO-3 path is tagged
FALLBACK_METRIC = "eval/gather_fallback"
TAG_EVAL_WEIGHTS = "raysweep.eval_weights"
EVAL_FALLBACK = "synced-fallback"

try:  # the Tune callback base class (Ray is a dependency; keep this module importable without it)
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001
    _TuneCallback = object  # type: ignore[assignment,misc]



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
        tracking = sweep.tracking
        uri = resolve_tracking_uri(tracking.uri)
        saved = read_run_file(experiment_path) if resume else None
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
            found = search_all(client, get_or_create_experiment(client, tracking.experiment, uri),
                                f"tags.`{TAG_PATH}` = '{quoted}' and tags.`{TAG_ROLE}` = 'sweep'")
            parent = min(found, key=lambda r: r.info.start_time or 0) if found else None
        reused = parent is not None
        if parent is not None:
            experiment_id = parent.info.experiment_id
            if parent.info.status != RUN_RUNNING:
                retrying(client.update_run, parent.info.run_id, RUN_RUNNING)
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
                warn(f"trial {summary.get('trial_id')}: {type(err).__name__}: {err}")
        try:  # anything else left RUNNING (e.g. a trial Tune no longer lists)
            for run in child_runs(client, self.experiment_id, self.parent_run_id):
                if run.info.status == RUN_RUNNING:
                    retrying(client.set_terminated, run.info.run_id, RUN_KILLED)
        except Exception as err:  # noqa: BLE001
            warn(f"sweeping leftover runs: {err}")
        parent = self.parent_run_id
        try:
            finished = [s for s in summaries if s["status"] == FINISHED]
            metrics = {
                "trials_total": len(summaries),
                "trials_finished": len(finished),
                "trials_early_stopped": sum(bool(s.get("early_stopped")) for s in summaries),
                "trials_errored": sum(s["status"] == ERRORED for s in summaries),
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
            warn(f"parent metrics: {err}")
        for file in files:
            try:
                path = Path(file)
                if path.is_file():
                    retrying(client.log_artifact, parent, str(path),
                             None if path.suffix == ".json" else "report")
            except Exception as err:  # noqa: BLE001
                warn(f"artifact {file}: {err}")
        status = RUN_KILLED if interrupted else (RUN_FINISHED if record is not None else RUN_FAILED)
        try:
            retrying(client.set_terminated, parent, status)
        except Exception as err:  # noqa: BLE001
            warn(f"parent status: {err}")

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
        if status == FINISHED:
            retrying(client.set_tag, run_id, TAG_EARLY, str(bool(summary.get("early_stopped"))).lower())
            if TAG_ERROR in run.data.tags:
                retrying(client.delete_tag, run_id, TAG_ERROR)
            if run.info.status != RUN_FINISHED:
                retrying(client.set_terminated, run_id, RUN_FINISHED)
        elif status == ERRORED:
            retrying(client.set_tag, run_id, TAG_ERROR, tag_value(summary.get("error") or "errored"))
            if run.info.status != RUN_FAILED:
                retrying(client.set_terminated, run_id, RUN_FAILED)
        elif run.info.status == RUN_RUNNING:
            retrying(client.set_terminated, run_id, RUN_KILLED)

    def abort(self, status: str = RUN_FAILED) -> None:
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
                if run.info.status == RUN_RUNNING:
                    client.set_terminated(run.info.run_id, RUN_KILLED)
            client.set_terminated(self.parent_run_id, status)
        except Exception as err:  # noqa: BLE001
            warn(f"abort: {err}")


# ----------------------------------------------------------------------------- the Tune callback


class NoTracker:
    """``tracking.enabled: false``: the driver's tracker interface, recording nothing."""

    def trial_info(self) -> None:
        return None

    def url(self) -> str:
        return "off (tracking.enabled: false); results are in the experiment directory only"

    def finalize(self, *args: Any, **kwargs: Any) -> None:
        return None

    def abort(self, status: str = RUN_FAILED) -> None:  # noqa: ARG002
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
        saved = read_run_file(self.experiment_path)
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
                    warn(f"no parent run found in {self.experiment_path}/{RUN_FILE}; trials are not tracked")
                    self._warned = True
                return
            fn()
        except Exception as err:  # noqa: BLE001 - tracking never stops the sweep
            warn(f"{what}: {type(err).__name__}: {err}")

    def _run_id(self, trial: Any, running: bool = True) -> str:
        trial_id = str(trial.trial_id)
        run_id = self._runs.get(trial_id)
        if run_id is None:
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
            warn(f"setup: {err}")

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
            if result.get(FALLBACK_METRIC) == 1:  # ZeRO-3 weights did not fit: hooked, synced evaluation
                retrying(client_for(self.uri).set_tag, run_id, TAG_EVAL_WEIGHTS, EVAL_FALLBACK)
            steps.add(step)

        self._guard(f"trial {trial.trial_id} result", log)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        def complete():
            client = client_for(self.uri)
            run_id = self._run_id(trial, running=False)
            planned = sampled_params(trial.config or {}).get("epochs")
            early = early_stopped(FINISHED, planned, trial.last_result)
            retrying(client.set_tag, run_id, TAG_EARLY, str(bool(early)).lower())
            retrying(client.set_tag, run_id, TAG_STATUS, FINISHED)
            retrying(client.set_terminated, run_id, RUN_FINISHED)

        self._guard(f"trial {trial.trial_id} end", complete)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ARG002
        def error():
            client = client_for(self.uri)
            run_id = self._run_id(trial, running=False)
            reason = None
            try:
                reason = error_reason(read_text(trial.error_file))
            except Exception:  # noqa: BLE001
                pass
            retrying(client.set_tag, run_id, TAG_ERROR, tag_value(reason or "errored"))
            retrying(client.set_tag, run_id, TAG_STATUS, ERRORED)
            retrying(client.set_terminated, run_id, RUN_FAILED)

        self._guard(f"trial {trial.trial_id} error", error)


def tune_callback(sweep: Any, experiment_path: str) -> TrackingCallback:
    saved = None
    try:
        saved = read_run_file(experiment_path)
    except Exception:  # noqa: BLE001
        pass
    saved = saved or {}
    return TrackingCallback(experiment_path, uri=saved.get("tracking_uri") or resolve_tracking_uri(sweep.tracking.uri),
                            parent_run_id=saved.get("parent_run_id"), experiment_id=saved.get("experiment_id"))



def tune_callbacks(sweep: Any, experiment_path: str) -> list:
    """The sweep's extra Tune callbacks: :class:`TrackingCallback` when tracking is on (pickled
    with the Tuner, ``--resume`` restores it)."""
    return [tune_callback(sweep, experiment_path)] if sweep.tracking.enabled else []


def open_tracker(sweep: Any, experiment_path: str, resume: bool, flag_file: str | None = None,
                 space_file: str = ""):
    """The sweep's parent run (:class:`NoTracker` when ``tracking.enabled: false``). An unusable
    store exits 2 before Ray starts, naming ``flag_file`` (``--mlflow-uri``) if given, else
    ``space_file``'s ``tracking.uri``."""
    from raysweep.config import fail

    if not sweep.tracking.enabled:
        return NoTracker()
    try:
        return SweepTracker.start(sweep, experiment_path, resume=resume)
    except Exception as err:  # noqa: BLE001 - an unusable store: say so before Ray starts
        first = str(err).splitlines()[0] if str(err) else ""
        fail(flag_file or space_file, "" if flag_file else "tracking.uri",
             f"cannot open MLflow store {sweep.tracking.uri!r}: {type(err).__name__}: {first}")
