"""A finished (or interrupted) sweep read back: one summary per trial from Tune's experiment
directory (:func:`summarize`, the content of ``trials.json``), ``best.json``
(:func:`best_record`) and the results table the command prints.

Layout of ``<storage>/<name>``: Tune's experiment state, one ``run_trial_<id>/`` per trial
(``params.json``, ``result.json``, ``experiment.json`` = the trial's full ExperimentConfig,
``outputs/`` = ``training.output_dir``, ``train_*/checkpoint_epoch_NNNN`` = the checkpoint Ray
kept, ``error.txt`` / ``diverged.txt`` when it failed), ``sweep.json`` (the validated sweep
configuration; ``--resume`` continues with it), ``mlflow.json`` (tracking URI, MLflow experiment
id and parent run id; ``--resume`` reuses that run), ``trials.json``, ``best.json``, ``report.md``
and the plots.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from raysweep.config import SweepConfig
from raysweep.sweep.results import (
    ERRORED, FINISHED, TUNE_KEYS, best_row, early_stopped, error_reason, pareto_front, result_step,
    sampled_params,
)
from raysweep.sweep.space import trial_experiment
from raysweep.sweep.storage import is_remote, read_text, write_json

OBJECTIVE_DEFINITION = "(MU + FE) / 2, maximised"


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if key in TUNE_KEYS or key.startswith("config/"):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        if value is None:
            continue
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


def _error_text(trial: Any) -> str | None:
    fs = getattr(getattr(trial, "storage", None), "storage_filesystem", None)
    filename = getattr(trial.run_metadata, "error_filename", None) or "error.txt"
    if fs is not None and hasattr(trial.storage, "trial_fs_path"):
        return read_text(f"{trial.storage.trial_fs_path}/{filename}", fs)
    return read_text(f"{trial.path}/{filename}")


def last_attempt(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the trial's last attempt. Tune appends every attempt's reports to one result
    file: a retry (``search.max_failures``, e.g. after a killed worker) or a trial restarted by
    ``--resume`` runs from epoch 1 again, so a step at or below the previous row's starts a new
    attempt."""
    start = 0
    for i in range(1, len(history)):
        step, previous = result_step(history[i]), result_step(history[i - 1])
        if step is not None and previous is not None and step <= previous:
            start = i
    return history[start:]


def trial_summary(trial: Any, frame: Any) -> dict[str, Any]:
    """One trial of an ``ExperimentAnalysis`` with its result frame, as a ``trials.json`` entry."""
    history = [] if frame is None or frame.empty else [_clean_row(r) for r in frame.to_dict("records")]
    history = last_attempt([h for h in history if "objective" in h])
    params = sampled_params(trial.config)
    best = best_row(history)
    checkpoints = [h["checkpoint_path"] for h in history if h.get("checkpoint_path")]
    error = None
    if trial.status == ERRORED:
        error = error_reason(_error_text(trial)) or "errored (no error file)"
    return {
        "trial_id": trial.trial_id,
        "trial_name": Path(trial.path).name if trial.path else str(trial),
        "path": trial.path,
        "status": trial.status,
        "started": _started(trial, frame),
        "params": params,
        "history": history,
        "best_epoch": best.get("epoch") if best else None,
        "best": best,
        "last": history[-1] if history else None,
        "checkpoint": ((best or {}).get("checkpoint_path") or (checkpoints[-1] if checkpoints else None))
        if history else None,
        "early_stopped": early_stopped(trial.status, params.get("epochs"), history[-1] if history else None),
        "error": error,
    }


def summarize(experiment_path: str) -> list[dict[str, Any]]:
    """One summary per trial of the experiment, read back from its directory, in start order."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    summaries = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        if frame is None:
            frame = frames.get(trial.path)
        summaries.append(trial_summary(trial, frame))
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


def sweep_pareto_front(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials on the MU/FE Pareto front, highest MU first.

    The front is the report's: every evaluated epoch of the finished trials
    (:func:`raysweep.sweep.results.pareto_front`; a summary without a history counts with its
    last row). One entry per trial with a point on it: that point (the trial's best objective
    among its front epochs) and ``front_epochs``, all of its points on the front.
    """
    points = [(s, row) for s in summaries if s["status"] == FINISHED
              for row in (s.get("history") or ([s["last"]] if s.get("last") else []))]
    by_trial: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for s, row in pareto_front(points):
        by_trial.setdefault(str(s["trial_id"]), (s, []))[1].append(row)
    out = []
    for s, rows in by_trial.values():
        top = max(rows, key=lambda r: r.get("objective") or 0.0)
        out.append({"trial_id": s["trial_id"], "params": s["params"], "epoch": top.get("epoch"),
                    "MU": top["MU"], "FE": top["FE"], "objective": top.get("objective"),
                    "checkpoint": s.get("checkpoint"),
                    "front_epochs": [{k: r.get(k) for k in ("epoch", "MU", "FE", "objective")} for r in rows]})
    return out


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
        "objective_definition": OBJECTIVE_DEFINITION,
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
        record["pareto_front"] = sweep_pareto_front(summaries)
    return record


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


RESULTS_HEADERS = ["trial", "status", "method", "lr", "epochs", "α", "β", "epoch", "MU", "FE", "objective", "note"]


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Trials sorted by objective (best epoch), errored and result-less trials last."""
    headers = RESULTS_HEADERS
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


def write_results(path: str, summaries: list[dict[str, Any]], record: dict[str, Any] | None) -> list[str]:
    """``trials.json``, and ``best.json`` and ``best.yaml`` (the best trial as an experiment file,
    :mod:`raysweep.sweep.export`) when there is a best trial, in the experiment directory; returns
    them as local files for MLflow (copies in a temporary directory for remote storage)."""
    from raysweep.sweep.export import BEST_YAML, write_trial_yaml

    local = None if not is_remote(path) else Path(tempfile.mkdtemp(prefix="raysweep-results-"))
    targets = [path] if local is None else [path, str(local)]
    for where in targets:
        write_json(f"{where}/trials.json", summaries)
        if record is not None:
            write_json(f"{where}/best.json", record)
            write_trial_yaml(path, record["trial_id"], f"{where}/{BEST_YAML}", summaries)
    names = ("best.json", BEST_YAML, "trials.json")
    return [f"{targets[-1]}/{n}" for n in names if Path(f"{targets[-1]}/{n}").is_file()]


def best_lines(record: dict[str, Any], path: str) -> str:
    """What the command prints about the best trial (and the Pareto front, in Pareto mode)."""
    m = record["metrics"]
    text = (f"Best trial {record['trial_id']} ({record['params'].get('method')}): objective "
            f"{m.get('objective'):.4f} (MU {m.get('MU', float('nan')):.4f}, FE {m.get('FE', float('nan')):.4f}) "
            f"at epoch {record['best_epoch']}; written to {path}/best.json")
    if record.get("pareto_front") is not None:
        text += f"\nPareto front (MU, FE): {len(record['pareto_front'])} trial(s), listed in best.json"
    return text
