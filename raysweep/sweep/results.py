"""What a trial's results mean, in one place: statuses, Tune's bookkeeping keys, the sampled
parameters of a trial config, a result's step, the best row, early stopping, the Pareto front
and the one-line reason of a failure. Pure functions of dicts (no Ray, no MLflow)."""

from __future__ import annotations

import math
from typing import Any, Iterable, TypeVar

# Tune's trial statuses we act on; MLflow's run statuses; the run status of each trial status.
FINISHED, ERRORED = "TERMINATED", "ERROR"
RUN_RUNNING, RUN_FINISHED, RUN_FAILED, RUN_KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
TUNE_TO_MLFLOW = {FINISHED: RUN_FINISHED, ERRORED: RUN_FAILED}
MLFLOW_TO_TUNE = {v: k for k, v in TUNE_TO_MLFLOW.items()}

# Tune's bookkeeping keys of a result: not metrics of the trial (``config/*`` neither).
TUNE_KEYS = frozenset({
    "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "should_checkpoint", "checkpoint_dir_name",
})

# The sampled parameters, in the flat names of ``experiment.training``; the integer-valued ones.
PARAM_KEYS = ("lr", "epochs", "forget_coeff", "reg_coeff", "beta", "lora_r")
INT_KEYS = frozenset({"epochs", "lora_r"})
GRID_KEY = "grid_point"  # algorithm: grid — the trial config is {GRID_KEY: {"method": …, "lr": …}}


def sampled_params(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's parameters in flat training-key names (``method``, ``lr``, ``beta``, ...).

    A Tune trial config from :class:`raysweep.sweep.space.SpaceBuilder` holds them flat (plus
    Optuna's namespaced copies, e.g. ``{"ME+GD": {"lr": ...}}``, which are ignored here); a grid
    trial holds them under :data:`GRID_KEY`.
    """
    if isinstance(config.get(GRID_KEY), dict):  # ``algorithm: grid``: the point is one grid value
        config = {**config, **config[GRID_KEY]}
    out: dict[str, Any] = {}
    if "method" in config:
        out["method"] = config["method"]
    for key in PARAM_KEYS:
        if key in config and not isinstance(config[key], dict):
            out[key] = config[key]
    return out


def result_step(metrics: dict[str, Any]) -> int | None:
    """The position of one report: its ``step`` (continual) or ``epoch`` (or Tune's iteration)."""
    for key in ("step", "epoch", "training_iteration"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def best_row(history: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest objective (the earliest of equal ones), None without any."""
    rows = [r for r in history if _number(r.get("objective"))]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["objective"], -(result_step(r) or 0)))


def early_stopped(status: str, planned_epochs: Any, last: dict[str, Any] | None) -> bool:
    """A trial that finished before its planned epochs: the scheduler (ASHA) stopped it."""
    epoch = (last or {}).get("epoch")
    return status == FINISHED and _number(planned_epochs) and _number(epoch) and int(epoch) < int(planned_epochs)


K = TypeVar("K")


def pareto_front(points: Iterable[tuple[K, dict[str, Any]]]) -> list[tuple[K, dict[str, Any]]]:
    """The ``(key, row)`` points whose (MU, FE) no other point dominates, highest MU first.

    The one definition of the front: the sweep (``best.json``) and the report pass every
    evaluated epoch of every finished trial, so they list the same points.
    """
    points = [(k, r) for k, r in points if _number(r.get("MU")) and _number(r.get("FE"))]

    def dominated(a, b):  # b dominates a
        return b["MU"] >= a["MU"] and b["FE"] >= a["FE"] and (b["MU"] > a["MU"] or b["FE"] > a["FE"])

    front = [(k, r) for k, r in points if not any(dominated(r, o) for _, o in points)]
    return sorted(front, key=lambda p: -p[1]["MU"])


def error_reason(text: str | None) -> str | None:
    """One line from a Tune ``error.txt``: our divergence message, else the last exception line."""
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        for ours in ("TrialDiverged: ", "TrialWorkerDied: "):  # raysweep.sweep.trial's one-line reasons
            if ours in line:
                return line.split(ours, 1)[1]
    for line in reversed(lines):
        if ": " in line and not line.startswith(("File ", "^", "~")):
            return line[:500]
    return lines[-1][:500] if lines else None
