"""Tests of ``raysweep.report`` without Ray: tables and plots from trial summaries (as in
``trials.json``), the command on an experiment directory and on an MLflow parent run, the
continual-scenario plot, bad inputs. (The report of a real sweep: ``tests/test_tracking.py``.)
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from raysweep.report import (ReportError, from_summaries, load_experiment, load_mlflow, main, markdown, pareto_points,
                             set_columns, write_report)


def _row(epoch, mu, fe, step=None, **extra):
    row = {"epoch": epoch, "MU": mu, "FE": fe, "objective": (mu + fe) / 2,
           "retain/R": mu, "forget/R": 1 - fe, "forget/ES": 0.5, "retain/TR": 0.4, "train/loss": 1.0,
           "time/train_s": 3.0, **extra}
    if step is not None:
        row["step"] = step
    return row


def _summary(trial_id, method, rows, status="TERMINATED", lr=1e-5, epochs=3, error=None):
    params = {"method": method, "lr": lr, "epochs": epochs, "forget_coeff": 1.0, "reg_coeff": 1.0}
    if method.startswith(("NPO", "DPO")) or method.endswith("AP"):
        params["beta"] = 0.1
    best = max(rows, key=lambda r: r["objective"]) if rows else None
    return {"trial_id": trial_id, "status": status, "params": params, "history": rows, "best": best,
            "last": rows[-1] if rows else None, "early_stopped": status == "TERMINATED" and len(rows) < epochs,
            "error": error, "checkpoint": None, "best_epoch": best and best["epoch"]}


SUMMARIES = [
    _summary("t1", "ME+GD", [_row(1, 0.9, 0.2), _row(2, 0.85, 0.5), _row(3, 0.7, 0.8)]),
    _summary("t2", "NPO+GD", [_row(1, 0.95, 0.1), _row(2, 0.9, 0.3)]),  # early-stopped
    _summary("t3", "GA+GD", [_row(1, 0.5, 0.9)], status="ERROR", error="DivergenceError: nan"),
    _summary("t4", "ME+GD", [_row(1, 0.6, 0.3), _row(2, 0.55, 0.4), _row(3, 0.5, 0.45)], lr=3e-4),
]


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200


def _table(text: str, title: str) -> list[list[str]]:
    block = text.split(f"## {title}")[1].split("\n## ")[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_tables_best_trial_per_method_and_per_set_columns(tmp_path):
    data = from_summaries(SUMMARIES, title="unit")
    assert data.methods() == ["GA+GD", "ME+GD", "NPO+GD"]  # by name: the same from every source
    best = data.best_per_method()
    assert best["ME+GD"][0].trial_id == "t1" and best["ME+GD"][1]["epoch"] == 3
    assert best["GA+GD"] is None  # errored trials do not count
    assert set_columns([r for e in best.values() if e for r in [e[1]]]) == \
        ["forget/R", "forget/ES", "retain/R", "retain/TR"]
    front = [(t.trial_id, r["epoch"]) for t, r in pareto_points(data)]
    assert front == [("t2", 1), ("t2", 2), ("t1", 2), ("t1", 3)]  # t1 epoch 1 is dominated by t2 epoch 2

    files = write_report(data, tmp_path)
    assert [f.name for f in files] == ["report.md", "mu_fe.png", "objective_history.png"]
    text = (tmp_path / "report.md").read_text()
    table4 = _table(text, "Best trial of each method")
    assert table4[0][:4] == ["Method", "MU", "FE", "Avg."]
    assert [r[0] for r in table4[1:]] == ["GA+GD", "ME+GD", "NPO+GD"]  # rows = methods
    rows = {r[0]: dict(zip(table4[0], r)) for r in table4[1:]}
    me = rows["ME+GD"]
    assert (me["MU"], me["FE"], me["Avg."], me["lr"], me["epochs"], me["best epoch"]) == \
        ("0.7000", "0.8000", "0.7500", "1.00e-05", "3", "3")
    assert rows["NPO+GD"]["β"] == "0.1000" and me["β"] == "-"
    assert "no finished trial" in rows["GA+GD"]["trial"]
    detail = _table(text, "Per-set metrics")
    assert detail[0] == ["Method", "forget/R", "forget/ES", "retain/R", "retain/TR"]
    assert [r[0] for r in detail[1:]] == ["GA+GD", "ME+GD", "NPO+GD"]
    assert "train/loss" not in text and "time/train_s" not in text
    assert "DivergenceError: nan" in text and "early-stopped" in text
    for name in ("mu_fe.png", "objective_history.png"):
        _png(tmp_path / name)


def test_continual_history_adds_the_steps_plot(tmp_path):
    rows = [_row(2, 0.9 - 0.1 * s, 0.3 + 0.1 * s, step=s) for s in (1, 2, 3)]
    other = [_row(2, 0.8 - 0.1 * s, 0.2 + 0.15 * s, step=s) for s in (1, 2, 3)]
    data = from_summaries([_summary("c1", "NPO+GD", rows), _summary("c2", "GA+GD", other)], title="continual")
    assert data.continual
    files = write_report(data, tmp_path)
    assert (tmp_path / "steps.png") in files
    _png(tmp_path / "steps.png")
    assert "best step" in (tmp_path / "report.md").read_text()


def test_restarted_trial_history_is_deduplicated_by_epoch():
    rows = [_row(1, 0.9, 0.1), _row(2, 0.8, 0.2), _row(1, 0.9, 0.1), _row(2, 0.8, 0.2), _row(3, 0.7, 0.3)]
    data = from_summaries([_summary("r1", "ME+GD", rows)])
    assert [r["epoch"] for r in data.trials[0].history] == [1, 2, 3]


def test_command_on_an_experiment_directory_and_bad_inputs(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "trials.json").write_text(json.dumps(SUMMARIES))
    (exp / "best.json").write_text(json.dumps({"trial_id": "t1", "params": {"method": "ME+GD"}, "best_epoch": 3,
                                               "metrics": SUMMARIES[0]["history"][-1], "checkpoint": None}))
    assert main([str(exp)]) == 0
    assert "Best trial: **t1** (ME+GD)" in (exp / "report.md").read_text()
    _png(exp / "mu_fe.png")
    assert main([str(exp), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "objective_history.png").is_file()
    capsys.readouterr()
    assert main([str(tmp_path)]) == 2  # a directory without trials.json
    assert main(["not/a/dir/nor-a-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    with pytest.raises(ReportError):
        load_experiment(tmp_path / "missing")


def test_from_an_mlflow_parent_run_matches_the_directory(tmp_path):
    """Parent + child runs logged as the tracker does; the report reads them back."""
    from raysweep.tracking import TAG_EARLY, TAG_ERROR, TAG_STATUS, client_for, ensure_child_run, log_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = client.create_experiment("report-unit", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment_id, run_name="exp", tags={"raysweep.role": "sweep"})
    parent_id = parent.info.run_id
    for s in SUMMARIES:
        run, _ = ensure_child_run(client, experiment_id, parent_id, s["trial_id"], s["params"])
        for row in s["history"]:
            log_metrics(client, run.info.run_id, {k: float(v) for k, v in row.items()}, row["epoch"])
        client.set_tag(run.info.run_id, TAG_EARLY, str(s["early_stopped"]).lower())
        client.set_tag(run.info.run_id, TAG_STATUS, s["status"])
        if s["error"]:
            client.set_tag(run.info.run_id, TAG_ERROR, s["error"])
        client.set_terminated(run.info.run_id, "FINISHED" if s["status"] == "TERMINATED" else "FAILED")
        time.sleep(0.01)  # distinct start times: the start order
    data = load_mlflow(parent_id, uri)
    assert [t.trial_id for t in sorted(data.trials, key=lambda t: t.order)] == ["t1", "t2", "t3", "t4"]
    reference = from_summaries(SUMMARIES, title="exp")
    assert markdown(data, []).split("## Best trial")[1] == markdown(reference, []).split("## Best trial")[1]
    child = client.search_runs([experiment_id], filter_string="tags.`raysweep.trial_id` = 't1'")[0]
    with pytest.raises(ReportError):
        load_mlflow(child.info.run_id, uri)  # a trial's run, not the sweep's
    assert main([parent_id, "--mlflow-uri", uri, "--out", str(tmp_path / "out")]) == 0
    _png(tmp_path / "out" / "mu_fe.png")



def test_trials_are_in_start_order():
    summaries = [dict(s, started=100.0 - i) for i, s in enumerate(SUMMARIES)]  # listed last-started first
    data = from_summaries(summaries)
    assert [t.trial_id for t in sorted(data.trials, key=lambda t: t.order)] == ["t4", "t3", "t2", "t1"]
