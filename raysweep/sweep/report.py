"""Paper-style tables and plots of a finished (or running) sweep (the command is
``python -m raysweep.report``, :mod:`raysweep.report`).

The input is an experiment directory (``trials.json`` / ``best.json`` written by
``raysweep.tune``) or the id of a sweep's MLflow parent run (its child runs and their metric
histories are read with ``MlflowClient``; tracking URI: ``--mlflow-uri`` >
``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``). It writes to ``--out`` (default: the
experiment directory, or ``./report-<run id prefix>``):

* ``report.md`` — per method its best trial (the epoch with the highest objective among finished
  and early-stopped trials) with MU, FE, Avg. (= objective) and the hyperparameters, like
  Table 4 of *A Closer Look at Machine Unlearning for LLMs*; the per-set metrics
  (``<set>/<metric>``) of those trials like Tables 5/6; the MU/FE Pareto front; every trial.
* ``mu_fe.png`` — FE against MU, one colour per method, one trajectory per trial, markers
  growing with the epoch (or continual step), the Pareto front highlighted (Figures 4/5).
* ``objective_history.png`` — the best objective so far against the number of trials started.
* ``steps.png`` — only for continual sweeps (``step`` in the history): MU and FE against the
  step for each method's best trial (Figure 6).

``raysweep.tune`` runs it at the end of every sweep (into the experiment directory, and logs
the files on the MLflow parent run).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysweep.sweep.mlflow_store import (
    TAG_EARLY, TAG_ERROR, TAG_METHOD, TAG_PARENT, TAG_STATUS, TAG_TRIAL, child_runs, client_for, resolve_tracking_uri,
)
from raysweep.sweep.results import ERRORED, FINISHED, MLFLOW_TO_TUNE, best_row, pareto_front, result_step
from raysweep.sweep.storage import copy_into, is_remote

CORE = ("objective", "MU", "FE", "epoch", "step")
NON_SET_PREFIXES = ("train", "time", "eval", "data")
METRIC_ORDER = ("R", "P", "TR", "TE", "CS", "ES")
FILES = ("report.md", "mu_fe.png", "objective_history.png", "steps.png")


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


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "lr" and isinstance(value, (int, float)):
        return f"{value:.2e}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def set_columns(rows: list[dict[str, Any]]) -> list[str]:
    """``<set>/<metric>`` columns: the forget set first, then sets in order; R P TR TE CS ES first."""
    sets: list[str] = []
    metrics: dict[str, list[str]] = {}
    for row in rows:
        for key in row:
            if "/" not in key:
                continue
            prefix, metric = key.split("/", 1)
            if prefix in NON_SET_PREFIXES:
                continue
            if prefix not in sets:
                sets.append(prefix)
                metrics[prefix] = []
            if metric not in metrics[prefix]:
                metrics[prefix].append(metric)
    first_seen = {name: i for i, name in enumerate(sets)}
    sets.sort(key=lambda s: (not s.startswith("forget"), first_seen[s]))
    order = {m: i for i, m in enumerate(METRIC_ORDER)}
    columns = []
    for s in sets:
        for metric in sorted(metrics[s], key=lambda m: (order.get(m, len(order)), m)):
            columns.append(f"{s}/{metric}")
    return columns


def pareto_points(data: SweepData) -> list[tuple[TrialData, dict[str, Any]]]:
    """Every evaluated (trial, epoch) of a finished trial that no other one dominates in (MU, FE)
    (:func:`raysweep.sweep.results.pareto_front`, as in ``best.json``)."""
    return pareto_front((t, r) for t in data.trials if t.finished for r in t.history)


def markdown(data: SweepData, plots: list[str]) -> str:
    x_name = "step" if data.continual else "epoch"
    statuses: dict[str, int] = {}
    for t in data.trials:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    early = sum(t.early_stopped for t in data.trials)
    out = [f"# raysweep report: {data.title}", "",
           f"Source: {data.source}. {len(data.trials)} trial(s): "
           + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
           + (f" ({early} stopped early by the scheduler)" if early else "") + ".",
           "", "Objective (Avg.) = (MU + FE) / 2, maximised; each trial counts at its best "
           f"{x_name}. MU: model utility (harmonic mean over the utility sets), FE: forget efficacy.", ""]
    if data.best:
        b, m = data.best, data.best.get("metrics") or {}
        out += [f"Best trial: **{b.get('trial_id')}** ({(b.get('params') or {}).get('method')}), objective "
                f"{_fmt(m.get('objective'))} (MU {_fmt(m.get('MU'))}, FE {_fmt(m.get('FE'))}) at epoch "
                f"{b.get('best_epoch')}; checkpoint: {b.get('checkpoint') or '-'}.", ""]

    best = data.best_per_method()
    has_fq = any(e and "forget_quality" in e[1] for e in best.values())
    headers = ["Method", "MU", "FE", "Avg.", *(["FQ"] if has_fq else []), "lr", "epochs",
               f"best {x_name}", "α", "β", "trial"]
    rows = []
    for method, entry in best.items():
        if entry is None:
            tried = [t for t in data.trials if t.method == method]
            rows.append([method, "-", "-", "-", *(["-"] if has_fq else []), "-", "-", "-", "-", "-",
                         f"no finished trial ({len(tried)} tried)"])
            continue
        t, r = entry
        p = t.params
        rows.append([method, _fmt(r.get("MU")), _fmt(r.get("FE")), _fmt(r.get("objective")),
                     *([_fmt(r.get("forget_quality"))] if has_fq else []), _fmt(p.get("lr"), "lr"),
                     _fmt(p.get("epochs")), _fmt(r.get(x_name, r.get("epoch"))), _fmt(p.get("forget_coeff")),
                     _fmt(p.get("beta")), t.trial_id + (" (early-stopped)" if t.early_stopped else "")])
    out += ["## Best trial of each method (cf. Table 4)", "", _table(headers, rows), ""]

    detail_rows = [e[1] for e in best.values() if e is not None]
    columns = set_columns(detail_rows)
    if columns:
        rows = [[m, *(_fmt(e[1].get(c)) if e else "-" for c in columns)] for m, e in best.items()]
        out += ["## Per-set metrics of each method's best trial (cf. Tables 5/6)", "",
                "R: ROUGE-L recall, P: probability, TR: truth ratio, TE: token entropy, CS: cosine "
                "similarity, ES: entailment score.", "", _table(["Method", *columns], rows), ""]

    front = pareto_points(data)
    if front:
        rows = [[t.trial_id, t.method, _fmt(r.get(x_name, r.get("epoch"))), _fmt(r.get("MU")), _fmt(r.get("FE")),
                 _fmt(r.get("objective"))] for t, r in front[:30]]
        out += ["## MU/FE Pareto front (every evaluated epoch of finished trials)", "",
                _table(["trial", "method", x_name, "MU", "FE", "Avg."], rows), ""]

    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]

    rows = []
    for t in sorted(data.trials, key=lambda t: t.order):
        r = t.best() if t.finished else None
        p = t.params
        note = t.error or ("early-stopped" if t.early_stopped else "")
        rows.append([t.order + 1, t.trial_id, t.method, t.status, _fmt(p.get("lr"), "lr"), _fmt(p.get("epochs")),
                     _fmt(p.get("forget_coeff")), _fmt(p.get("beta")),
                     _fmt((r or {}).get(x_name, (r or {}).get("epoch"))), _fmt((r or {}).get("MU")),
                     _fmt((r or {}).get("FE")), _fmt((r or {}).get("objective")), note[:120]])
    out += ["## All trials (in start order)", "",
            _table(["#", "trial", "method", "status", "lr", "epochs", "α", "β", f"best {x_name}", "MU", "FE",
                    "Avg.", "note"], rows), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_mu_fe(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    methods = data.methods()
    colors = _colors(methods)
    xs = [_x(r) for t in data.trials for r in t.history]
    if not xs:
        return False
    low, high = min(xs), max(xs)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    for t in sorted(data.trials, key=lambda t: t.order):
        rows = [r for r in t.history if isinstance(r.get("MU"), (int, float)) and isinstance(r.get("FE"), (int, float))]
        if not rows:
            continue
        mu, fe = [r["MU"] for r in rows], [r["FE"] for r in rows]
        sizes = [18 + 90 * ((_x(r) - low) / (high - low) if high > low else 0.5) for r in rows]
        color = colors[t.method]
        style = "-" if t.status == FINISHED else ":"
        ax.plot(mu, fe, style, color=color, alpha=0.55, linewidth=1.2)
        marker = {"marker": "o", "edgecolors": "white", "linewidths": 0.5} if t.status == FINISHED else {"marker": "x"}
        ax.scatter(mu, fe, s=sizes, color=color, alpha=0.8, zorder=3, **marker)
    front = pareto_points(data)
    if front:
        fx, fy = [r["MU"] for _, r in front], [r["FE"] for _, r in front]
        ax.plot(fx, fy, "--", color="black", linewidth=1.2, zorder=4)
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=1.5, zorder=5)
    ax.set_xlabel("MU (model utility)")
    ax.set_ylabel("FE (forget efficacy)")
    unit = "step" if data.continual else "epoch"
    ax.set_title(f"{data.title}: FE vs MU per trial (marker size grows with the {unit})", fontsize=10)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="-", label=m) for m in methods
               if any(t.method == m and t.history for t in data.trials)]
    if any(t.status != FINISHED and t.history for t in data.trials):
        handles.append(Line2D([], [], color="gray", marker="x", linestyle=":", label="unfinished / errored"))
    if front:
        handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="--",
                              label="Pareto front"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_objective_history(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    trials = sorted(data.trials, key=lambda t: t.order)
    if not trials:
        return False
    colors = _colors(data.methods())
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    best_so_far, xs, ys = None, [], []
    labelled: set[str] = set()
    for n, t in enumerate(trials, start=1):
        row = t.best() if t.finished else None
        if row is not None:
            value = row["objective"]
            best_so_far = value if best_so_far is None else max(best_so_far, value)
            ax.scatter([n], [value], color=colors[t.method], s=30, zorder=3, alpha=0.8,
                       label=t.method if t.method not in labelled else None)
            labelled.add(t.method)
        elif t.status == ERRORED:
            ax.axvline(n, color="red", alpha=0.15, linewidth=4)
        if best_so_far is not None:
            xs.append(n)
            ys.append(best_so_far)
    if xs:
        ax.step(xs, ys, where="post", color="black", linewidth=1.8, label="best so far", zorder=4)
    ax.set_xlabel("trials started")
    ax.set_ylabel("objective (MU + FE) / 2")
    ax.set_title(f"{data.title}: best objective so far (red: errored trials)", fontsize=10)
    ax.set_xlim(0.5, len(trials) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if labelled or xs:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_steps(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    best = {m: e for m, e in data.best_per_method().items() if e is not None}
    if not best:
        return False
    colors = _colors(data.methods())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120, sharex=True)
    for method, (t, _) in best.items():
        rows = [r for r in t.history if "step" in r]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("MU", "FE")):
            ax.plot(steps, [r.get(key, math.nan) for r in rows], "-o", color=colors[method], label=method,
                    markersize=4)
    for ax, key, name in zip(axes, ("MU", "FE"), ("model utility", "forget efficacy")):
        ax.set_xlabel("continual step (forget subtask)")
        ax.set_ylabel(f"{key} ({name})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data.title}: continual unlearning, best trial of each method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- writing


def write_report(data: SweepData, out: str | Path) -> list[Path]:
    """Writes ``report.md`` and the plots into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[str] = []
    for name, fn, wanted in (("mu_fe.png", plot_mu_fe, True),
                             ("objective_history.png", plot_objective_history, True),
                             ("steps.png", plot_steps, data.continual)):
        if not wanted:
            continue
        if fn(data, out / name):
            written.append(out / name)
            plots.append(name)
    (out / "report.md").write_text(markdown(data, plots))
    return [out / "report.md", *written]


def report_sweep(summaries: list[dict[str, Any]], best: dict[str, Any] | None, experiment_path: str,
                 out: str | Path | None = None) -> list[Path]:
    """The end-of-sweep report (called by ``raysweep.tune.main``), written next to ``trials.json``.

    For remote storage (``s3://…``) the files are written to a local temporary directory and
    copied into the experiment directory; the returned paths are the local ones.
    """
    name = experiment_path.rstrip("/").rsplit("/", 1)[-1]
    data = from_summaries(summaries, best, title=name, source=f"experiment directory {experiment_path}")
    if not is_remote(experiment_path):
        return write_report(data, out or experiment_path)
    local = Path(out or tempfile.mkdtemp(prefix="raysweep-report-"))
    files = write_report(data, local)
    copy_into(files, experiment_path)
    return files
