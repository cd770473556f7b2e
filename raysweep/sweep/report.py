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

import math
import tempfile
from pathlib import Path
from typing import Any

from raysweep.sweep.plots import plot_mu_fe, plot_objective_history, plot_steps
from raysweep.sweep.report_data import SweepData, from_summaries, pareto_points
from raysweep.sweep.storage import copy_into, is_remote

NON_SET_PREFIXES = ("train", "time", "eval", "data")
METRIC_ORDER = ("R", "P", "TR", "TE", "CS", "ES")
FILES = ("report.md", "mu_fe.png", "objective_history.png", "steps.png")


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
