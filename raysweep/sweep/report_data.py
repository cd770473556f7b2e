"""A sweep's results as the report reads them (:class:`SweepData`): from ``trials.json`` /
``best.json`` in an experiment directory, or from a sweep's MLflow parent run and its children."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysweep.sweep.mlflow_store import (
    TAG_EARLY, TAG_ERROR, TAG_METHOD, TAG_PARENT, TAG_STATUS, TAG_TRIAL, child_runs, client_for, resolve_tracking_uri,
)
from raysweep.sweep.results import FINISHED, MLFLOW_TO_TUNE, best_row, pareto_front, result_step

CORE = ("objective", "MU", "FE", "epoch", "step")


class ReportError(Exception):
    """Bad input (no such directory / run); the command prints it on one line and exits 2."""


@dataclass
class TrialData:
    trial_id: str
    method: str
    params: dict[str, Any]
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, ...
    history: list[dict[str, Any]]  # one row per epoch (or continual step), in order
    early_stopped: bool = False
    error: str | None = None
    order: int = 0  # start order (trials.json is sorted by "started"; MLflow: child run start time)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED and any("objective" in r for r in self.history)

    def best(self) -> dict[str, Any] | None:
        return best_row(self.history)


@dataclass
class SweepData:
    title: str
    source: str
    trials: list[TrialData]
    best: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def continual(self) -> bool:
        return any("step" in r for t in self.trials for r in t.history)

    def methods(self) -> list[str]:
        # by name: trial start order differs between the experiment dir and MLflow when
        # concurrent trials start together, and the report must not depend on its source
        return sorted({t.method for t in self.trials})

    def best_per_method(self) -> dict[str, tuple[TrialData, dict[str, Any]] | None]:
        out: dict[str, tuple[TrialData, dict[str, Any]] | None] = {m: None for m in self.methods()}
        for t in self.trials:
            if not t.finished:
                continue
            row = t.best()
            if row is None:
                continue
            current = out.get(t.method)
            if current is None or row["objective"] > current[1]["objective"]:
                out[t.method] = (t, row)
        return out


def _x(row: dict[str, Any]) -> float:
    """The position of a history row: continual step, else epoch."""
    return float(result_step(row) or 0)


def _dedupe(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step/epoch (the last one reported: a restarted trial reports again)."""
    by_x: dict[float, dict[str, Any]] = {}
    for row in history:
        by_x[_x(row)] = row
    return [by_x[k] for k in sorted(by_x)]


# ----------------------------------------------------------------------------- inputs


def from_summaries(summaries: list[dict[str, Any]], best: dict[str, Any] | None = None, title: str = "",
                   source: str = "") -> SweepData:
    """From ``raysweep.sweep.summary.summarize`` output (the content of ``trials.json``, in trial start order)."""
    trials = []
    if all(isinstance(s.get("started"), (int, float)) for s in summaries):
        summaries = sorted(summaries, key=lambda s: s["started"])
    for i, s in enumerate(summaries):
        params = dict(s.get("params") or {})
        history = [r for r in (s.get("history") or []) if isinstance(r, dict)]
        trials.append(TrialData(
            trial_id=str(s.get("trial_id")), method=str(params.get("method", "?")), params=params,
            status=str(s.get("status")), history=_dedupe(history), early_stopped=bool(s.get("early_stopped")),
            error=s.get("error"), order=i,
        ))
    return SweepData(title=title, source=source, trials=trials, best=best)


def load_experiment(path: str | Path) -> SweepData:
    directory = Path(path)
    trials_file = directory / "trials.json"
    if not trials_file.is_file():
        raise ReportError(f"{directory}: no trials.json (is this a raysweep experiment directory of a finished sweep?)")
    summaries = json.loads(trials_file.read_text())
    best_file = directory / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    return from_summaries(summaries, best, title=directory.name, source=f"experiment directory {directory}")


def load_mlflow(run_id: str, uri: str | None = None) -> SweepData:
    """From a sweep's MLflow parent run: its children and their metric histories."""
    uri = resolve_tracking_uri(uri)
    client = client_for(uri)
    try:
        parent = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        raise ReportError(f"MLflow run {run_id!r} not found in {uri} ({type(err).__name__})") from None
    if TAG_PARENT in parent.data.tags:
        raise ReportError(f"MLflow run {run_id} is a trial's run; give its sweep's run {parent.data.tags[TAG_PARENT]}")
    children = child_runs(client, parent.info.experiment_id, run_id)
    if not children:
        raise ReportError(f"MLflow run {run_id} has no child runs (is it a raysweep sweep run?)")

    def history(run, keys) -> list[dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        for key in keys:
            for m in client.get_metric_history(run.info.run_id, key):
                value = m.value
                if key in ("epoch", "step") and float(value).is_integer():
                    value = int(value)
                rows.setdefault(m.step, {})[key] = value
        out = []
        for step in sorted(rows):
            row = rows[step]
            if "epoch" not in row and "step" not in row:
                row["epoch"] = step
            out.append(row)
        return out

    trials = []
    # The child run is created when Tune starts the trial: its start time is the start order.
    for i, run in enumerate(sorted(children, key=lambda r: r.info.start_time or 0)):
        tags, params = run.data.tags, dict(run.data.params)
        for key, value in list(params.items()):
            params[key] = _parse_param(value)
        status = tags.get(TAG_STATUS) or MLFLOW_TO_TUNE.get(run.info.status, run.info.status)
        core = [k for k in CORE if k in run.data.metrics]
        trials.append(TrialData(
            trial_id=tags.get(TAG_TRIAL, run.info.run_id), method=str(params.get("method") or tags.get(TAG_METHOD, "?")),
            params=params, status=status, history=history(run, core), early_stopped=tags.get(TAG_EARLY) == "true",
            error=tags.get(TAG_ERROR), order=i,
        ))
        trials[-1]._run = run  # type: ignore[attr-defined]
    data = SweepData(title=parent.info.run_name or run_id, source=f"MLflow run {run_id} ({uri})", trials=trials)
    # The per-set metrics are only needed for each method's best trial: read those in full.
    for entry in data.best_per_method().values():
        if entry is not None:
            t = entry[0]
            t.history = history(t._run, list(t._run.data.metrics))  # type: ignore[attr-defined]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "best.json", tmp)
            data.best = json.loads(Path(local).read_text())
    except Exception:  # noqa: BLE001 - a running sweep has none yet
        data.best = None
    return data


def _parse_param(value: str) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    if re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return number


def pareto_points(data: SweepData) -> list[tuple[TrialData, dict[str, Any]]]:
    """Every evaluated (trial, epoch) of a finished trial that no other one dominates in (MU, FE)
    (:func:`raysweep.sweep.results.pareto_front`, as in ``best.json``)."""
    return pareto_front((t, r) for t in data.trials if t.finished for r in t.history)
