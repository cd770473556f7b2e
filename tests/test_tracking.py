"""Tests of ``raysweep.tracking``: MLflow parent/child runs, per-epoch metrics, generation tables,
redaction, status reconciliation, and (with the fast fake worker) a whole sweep read back with
``MlflowClient``, including the report from the experiment directory and from the MLflow run.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raysweep.config import SweepConfig
from raysweep.tracking import (
    RUN_FILE, TAG_EARLY, TAG_ERROR, TAG_PARENT, TAG_TRIAL, GenerationLogger, SweepTracker, child_runs,
    client_for, flatten, generation_rows, numeric_metrics, redact_text, resolve_tracking_uri, result_step, sanitize_key,
    tune_callback,
)

import fake_worker  # tests/ is on sys.path (pytest's rootdir-relative imports)
from test_tune import FAKE_WORKER, fake_env, run_cli, tail, write_yaml

FORGET_TEXTS = fake_worker.FORGET_QUESTIONS + fake_worker.FORGET_ANSWERS + ["Zorblax", "purple-xylophone"]


# ----------------------------------------------------------------------------- helpers (no MLflow)


def test_tracking_uri_precedence_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/env.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db", cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", cwd=tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://host:5000", cwd=tmp_path) == "http://host:5000"
    assert resolve_tracking_uri("mlruns", cwd=tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()


def test_metric_names_are_sanitized_and_tune_keys_dropped():
    assert sanitize_key("forget/R") == "forget/R"
    assert sanitize_key("space.ME+GD.lr") == "space.ME_GD.lr"
    assert sanitize_key("/a//b/../c/") == "a/b/c"
    result = {"epoch": 2, "MU": 0.5, "forget/R": 0.25, "ES_flag": True, "training_iteration": 2, "done": False,
              "trial_id": "x", "config": {"lr": 1}, "note": "text", "weird+name": 1.0}
    assert numeric_metrics(result) == {"epoch": 2.0, "MU": 0.5, "forget/R": 0.25, "ES_flag": 1.0, "weird_name": 1.0}


def test_mlflow_step_is_the_continual_step_then_the_epoch():
    assert result_step({"step": 3, "epoch": 2, "training_iteration": 3}) == 3  # continual: per request
    assert result_step({"epoch": 2, "training_iteration": 5}) == 2
    assert result_step({"training_iteration": 4}) == 4
    assert result_step({"epoch": float("nan")}) is None and result_step({"step": True}) is None


def test_flatten_renders_ranges_and_lists():
    data = {"search": {"space": {"lr": {"loguniform": [1e-4, 3e-3]}, "epochs": 3}, "methods": ["GA+GD"]}}
    assert flatten(data) == {"search.space.lr": "loguniform(0.0001, 0.003)", "search.space.epochs": "3",
                             "search.methods": '["GA+GD"]'}


def test_generation_rows_redact_the_forget_set_everywhere():
    samples = fake_worker.samples("GA+GD", 1, 0.9, 0.2)
    plain = generation_rows(samples, redact_forget=False)
    assert [r["set"] for r in plain] == ["forget"] * 3 + ["retain"] * 2
    assert plain[0]["question"] == fake_worker.FORGET_QUESTIONS[0] and plain[0]["ES"] is True
    rows = generation_rows(samples, redact_forget=True)
    text = json.dumps(rows)
    for secret in FORGET_TEXTS:
        assert secret not in text
    assert rows[0]["question"] == redact_text(fake_worker.FORGET_QUESTIONS[0])
    assert rows[0]["ground_truth"] == rows[0]["generation"]  # equal texts, equal hashes
    assert rows[3]["question"] == fake_worker.RETAIN_QUESTIONS[0]  # the retain set stays readable
    assert rows[4]["generation"].startswith("sha256:")  # a retain generation leaking a forget answer
    assert rows[0]["R"] == plain[0]["R"]


# ----------------------------------------------------------------------------- the pieces, on one store


SWEEP = {
    "experiment": {"name": "unit", "training": {"epochs": 3}},
    "search": {"methods": ["ME+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}, "epochs": 3}},
    "tracking": {"experiment": "unit-tracking", "redact_forget": True},
}


def _trial(trial_id, method="ME+GD", epochs=3, last=None, error_file=None):
    return SimpleNamespace(trial_id=trial_id, config={"method": method, "lr": 1e-5, "epochs": epochs,
                                                     method: {"lr": 1e-5}},
                           last_result=last or {}, error_file=error_file)


def _steps(client, run_id, key="objective"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_parent_children_callback_generations_resume_and_finalize(tmp_path):
    """Driver, callback and worker logger without Ray: one parent, runs found again by tag after a
    pickle round trip (= --resume), one point per epoch on a restart, statuses reconciled."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = SweepConfig.model_validate({**SWEEP, "tracking": {**SWEEP["tracking"], "uri": uri}})
    path = str(tmp_path / "exp")
    tracker = SweepTracker.start(sweep, path)
    client = client_for(uri)
    saved = json.loads((tmp_path / "exp" / RUN_FILE).read_text())
    assert saved == {"tracking_uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id}
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.info.run_name == "exp"
    params = parent.data.params
    assert params["experiment.training.epochs"] == "3"
    assert params["search.space.lr"] == "loguniform(1e-06, 0.0001)"
    assert params["space.NPO_GD.lr"] == "loguniform(1e-06, 0.0001)"
    assert params["tracking.redact_forget"] == "True"
    assert {"version.raysweep", "version.ray", "version.torch", "version.mlflow"} <= set(params)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())

    callback = pickle.loads(pickle.dumps(tune_callback(sweep, path)))  # Tune pickles it with the Tuner
    callback.setup()
    a, b = _trial("aaaa0001"), _trial("bbbb0002", "NPO+GD")
    callback.on_trial_start(0, [], a)
    for epoch in (1, 2):
        callback.on_trial_result(0, [], a, {"epoch": epoch, "MU": 0.5, "FE": 0.1 * epoch, "objective": 0.3,
                                            "forget/R": 0.9, "training_iteration": epoch, "config": {}})
    callback.on_trial_start(0, [], b)
    callback.on_trial_result(0, [], b, {"epoch": 1, "MU": 0.4, "FE": 0.2, "objective": 0.3})
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback:\n  File 'x'\nraysweep.trial.TrialDiverged: DivergenceError: loss became nan\n")
    b.error_file = str(error_file)
    callback.on_trial_error(0, [], b)

    runs = {r.data.tags[TAG_TRIAL]: r for r in child_runs(client, tracker.experiment_id, tracker.parent_run_id)}
    assert set(runs) == {"aaaa0001", "bbbb0002"}
    run_a, run_b = runs["aaaa0001"], runs["bbbb0002"]
    assert run_a.info.run_name == "ME+GD-aaaa0001" and run_a.data.tags[TAG_PARENT] == tracker.parent_run_id
    assert run_a.data.params == {"method": "ME+GD", "lr": "1e-05", "epochs": "3"}
    assert run_a.info.status == "RUNNING" and _steps(client, run_a.info.run_id) == [1, 2]
    assert _steps(client, run_a.info.run_id, "forget/R") == [1, 2]
    assert run_b.info.status == "FAILED" and run_b.data.tags[TAG_ERROR] == "DivergenceError: loss became nan"

    # Rank 0's generations: one table per epoch, redacted, never twice.
    info = {**tracker.trial_info(), "trial_id": "aaaa0001", "params": {"method": "ME+GD"}}
    logger = GenerationLogger(info)
    assert logger.log(1, fake_worker.samples("ME+GD", 1, 0.5, 0.1)) == "generations/epoch_001.json"
    assert logger.log(1, fake_worker.samples("ME+GD", 1, 0.5, 0.1)) is None  # already there
    assert logger.log(2, fake_worker.samples("ME+GD", 2, 0.5, 0.2)) == "generations/epoch_002.json"
    assert logger.run_id == run_a.info.run_id
    table = Path(client.download_artifacts(run_a.info.run_id, "generations/epoch_001.json", str(tmp_path)))
    content = table.read_text()
    assert all(secret not in content for secret in FORGET_TEXTS) and fake_worker.RETAIN_ANSWERS[0] in content
    assert json.loads(content)["columns"][:4] == ["set", "question", "ground_truth", "generation"]
    assert GenerationLogger({**info, "trial_id": "cccc0003"}).log(1, fake_worker.samples("x", 1, 1, 1)) == \
        "generations/epoch_001.json"  # a trial whose run the driver did not create: created by tag

    # --resume: a new driver process, the same parent run; the restarted trial reports epochs 1-3.
    resumed = SweepTracker.start(sweep, path, resume=True)
    assert resumed.parent_run_id == tracker.parent_run_id
    (tmp_path / "exp" / RUN_FILE).unlink()  # lost: the parent is found by its experiment-path tag
    assert SweepTracker.start(sweep, path, resume=True).parent_run_id == tracker.parent_run_id
    callback2 = pickle.loads(pickle.dumps(callback))
    callback2.setup()
    callback2.on_trial_start(0, [], a)
    for epoch in (1, 2, 3):
        callback2.on_trial_result(0, [], a, {"epoch": epoch, "MU": 0.6, "FE": 0.1, "objective": 0.35})
    a.last_result = {"epoch": 3}
    callback2.on_trial_complete(0, [], a)
    run_a = client.get_run(run_a.info.run_id)
    assert _steps(client, run_a.info.run_id) == [1, 2, 3]  # one point per epoch
    assert run_a.info.status == "FINISHED" and run_a.data.tags[TAG_EARLY] == "false"

    # End of the sweep: Tune's statuses win; a trial nobody tracked gets its run, back-filled.
    history = [{"epoch": e, "MU": 0.6, "FE": 0.1, "objective": 0.35} for e in (1, 2, 3)]
    summaries = [
        {"trial_id": "aaaa0001", "status": "TERMINATED", "params": {"method": "ME+GD"}, "history": history,
         "early_stopped": False, "best": history[-1], "error": None},
        {"trial_id": "bbbb0002", "status": "ERROR", "params": {"method": "NPO+GD"}, "history": history[:1],
         "early_stopped": False, "best": history[0], "error": "DivergenceError: loss became nan"},
        {"trial_id": "dddd0004", "status": "TERMINATED", "params": {"method": "NPO+GD", "lr": 1e-4},
         "history": history[:2], "early_stopped": True, "best": history[1], "error": None},
    ]
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"trial_id": "aaaa0001", "metrics": history[-1]}))
    resumed.finalize(summaries, {"trial_id": "aaaa0001", "metrics": history[-1]}, [best])
    runs = {r.data.tags[TAG_TRIAL]: r for r in child_runs(client, tracker.experiment_id, tracker.parent_run_id)}
    assert set(runs) == {"aaaa0001", "bbbb0002", "cccc0003", "dddd0004"}
    assert runs["dddd0004"].info.status == "FINISHED" and runs["dddd0004"].data.tags[TAG_EARLY] == "true"
    assert _steps(client, runs["dddd0004"].info.run_id) == [1, 2]
    assert runs["cccc0003"].info.status == "KILLED"  # not a trial Tune knows: not left RUNNING
    assert not [r for r in client.search_runs([tracker.experiment_id]) if r.info.status == "RUNNING"]
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == 0.35 and parent.data.metrics["trials_errored"] == 1
    assert [a.path for a in client.list_artifacts(tracker.parent_run_id)] == ["best.json"]

    # A sweep that dies before any trial (e.g. Ray cannot start) leaves no empty parent behind;
    # one that dies later leaves nothing RUNNING.
    early = SweepTracker.start(sweep, str(tmp_path / "early"))
    early.abort()
    assert client.get_run(early.parent_run_id).info.lifecycle_stage == "deleted"
    late = SweepTracker.start(sweep, str(tmp_path / "late"))
    callback = tune_callback(sweep, str(tmp_path / "late"))
    callback.on_trial_start(0, [], _trial("eeee0005"))
    late.abort("KILLED")
    assert client.get_run(late.parent_run_id).info.status == "KILLED"
    assert [r.info.status for r in child_runs(client, late.experiment_id, late.parent_run_id)] == ["KILLED"]


# ----------------------------------------------------------------------------- a real sweep (fake worker)


TRACKED = {
    "experiment": {"name": "tracked", "training": {"lr": 1e-5, "epochs": 2}},
    "search": {
        "methods": ["NPO+GD", "GA+GD"],
        "space": {"lr": {"loguniform": [1e-6, 1e-4]}, "epochs": 2, "forget_coeff": {"uniform": [0.05, 1.0]},
                  "beta": {"loguniform": [0.05, 0.5]}},
        "num_samples": 3,
        "max_concurrent": 2,
        "seed": 3,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    },
    "tracking": {"experiment": "tracked-sweep", "redact_forget": True},
}


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    """3 trials (NPO+GD and GA+GD, 2 epochs, ASHA; GA+GD's default diverges at epoch 2), MLflow
    store given by $MLFLOW_TRACKING_URI, forget-set redaction on."""
    tmp = tmp_path_factory.mktemp("tracked")
    space = write_yaml(tmp / "space.yaml", TRACKED)
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = fake_env(tmp, RAYSWEEP_FAKE_DIVERGE_LR="1e-5", RAYSWEEP_FAKE_DIVERGE_METHOD="GA+GD",
                   RAYSWEEP_FAKE_SLEEP="0.3", MLFLOW_TRACKING_URI=uri)
    log = tmp / "driver.log"
    started = time.time()
    proc = run_cli(["--space", str(space), "--storage", str(tmp / "results"), "--name", "sweep"], env, log)
    seconds = time.time() - started
    print(f"tracked sweep: {seconds:.0f} s")
    return {"tmp": tmp, "proc": proc, "log": log, "path": tmp / "results" / "sweep", "uri": uri,
            "seconds": seconds}


def _sweep_runs(tracked):
    assert tracked["proc"].returncode == 0, tail(tracked["log"])
    client = client_for(tracked["uri"])
    experiment = client.get_experiment_by_name("tracked-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if TAG_PARENT not in r.data.tags]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    return client, parents, children


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_has_one_parent_and_a_child_per_trial(tracked_sweep):
    client, parents, children = _sweep_runs(tracked_sweep)
    path = tracked_sweep["path"]
    assert len(parents) == 1
    parent = parents[0]
    assert json.loads((path / RUN_FILE).read_text())["parent_run_id"] == parent.info.run_id
    trials = {t["trial_id"]: t for t in json.loads((path / "trials.json").read_text())}
    assert len(trials) == 3 and len(children) == 3
    assert {c.data.tags[TAG_TRIAL] for c in children} == set(trials)
    for child in children:
        trial = trials[child.data.tags[TAG_TRIAL]]
        assert child.data.tags[TAG_PARENT] == parent.info.run_id
        assert child.info.run_name == f"{trial['params']['method']}-{trial['trial_id']}"
        assert child.data.params["method"] == trial["params"]["method"]
        assert math.isclose(float(child.data.params["lr"]), trial["params"]["lr"])
        # One point per completed epoch, at step = epoch, for every metric the trial reported.
        epochs = [row["epoch"] for row in trial["history"]]
        for key in ("objective", "MU", "FE", "forget/ROUGE"):
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == epochs, (key, trial["trial_id"])
            assert [m.value for m in history] == pytest.approx([row[key] for row in trial["history"]])
        # The generations table of each epoch (rank 0 logs it before reporting; a trial ASHA
        # stops may have evaluated one more epoch before the stop reached its worker).
        tables = sorted(a.path for a in client.list_artifacts(child.info.run_id, "generations"))
        expected = [f"generations/epoch_{e:03d}.json" for e in epochs]
        assert tables[:len(expected)] == expected and len(tables) <= len(expected) + 1, tables
        if trial["status"] == "TERMINATED":
            assert child.info.status == "FINISHED"
            assert child.data.tags[TAG_EARLY] == str(trial["early_stopped"]).lower()
        else:
            assert trial["status"] == "ERROR" and child.info.status == "FAILED"
            assert child.data.tags[TAG_ERROR].startswith("DivergenceError: loss became nan at epoch 2")
    assert [r for r in (parent, *children) if r.info.status == "RUNNING"] == []
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.methods"] == '["NPO+GD", "GA+GD"]'
    assert "version.ray" in parent.data.params
    assert parent.data.metrics["trials_total"] == 3 and parent.data.metrics["trials_errored"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.json", "trials.json", "report"} <= artifacts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/mu_fe.png", "report/objective_history.png"} <= report
    # The store lives where the URI says (absolute), artifacts next to it: nothing in the repo.
    assert (tracked_sweep["tmp"] / "mlruns").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_forget_text_in_any_artifact(tracked_sweep, tmp_path):
    client, parents, children = _sweep_runs(tracked_sweep)
    texts = []
    for run in (*parents, *children):
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        texts += [p.read_text(errors="replace") for p in local.rglob("*") if p.is_file()]
    assert len(texts) >= 3 + 5
    everything = "\n".join(texts)
    for secret in FORGET_TEXTS:
        assert secret not in everything, secret
    assert fake_worker.RETAIN_ANSWERS[0] in everything  # the retain set is logged in clear
    assert "sha256:" in everything


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200


def _method_rows(markdown: str) -> list[str]:
    lines = markdown.split("## Best trial of each method")[1].split("\n## ")[0].splitlines()
    return [line.split("|")[1].strip() for line in lines if line.startswith("| ") and not line.startswith("| Method")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_of_the_sweep_from_directory_and_mlflow_run(tracked_sweep, tmp_path):
    from raysweep.report import main as report_main

    _, parents, _ = _sweep_runs(tracked_sweep)
    path = tracked_sweep["path"]
    # Written by the sweep itself.
    markdown = (path / "report.md").read_text()
    assert sorted(_method_rows(markdown)) == ["GA+GD", "NPO+GD"]
    assert "forget/ROUGE" in markdown and "Pareto front" in markdown
    for name in ("mu_fe.png", "objective_history.png"):
        _png(path / name)
    assert not (path / "steps.png").exists()
    # From the directory again, and from the MLflow parent run: the same tables.
    assert report_main([str(path), "--out", str(tmp_path / "dir")]) == 0
    assert report_main([parents[0].info.run_id, "--mlflow-uri", tracked_sweep["uri"],
                        "--out", str(tmp_path / "run")]) == 0
    from_dir = (tmp_path / "dir" / "report.md").read_text()
    from_run = (tmp_path / "run" / "report.md").read_text()
    assert _method_rows(from_run) == _method_rows(from_dir) == _method_rows(markdown)
    table = lambda text: text.split("## Best trial of each method")[1].split("## Per-set")[0]  # noqa: E731
    assert table(from_run) == table(from_dir)
    # The same trials in the same start order (trials.json: Tune's start time; MLflow: child runs,
    # created when Tune starts each trial).
    trials_of = lambda text: [line.split("|")[2].strip() for line in text.split("## All trials")[1].splitlines()  # noqa: E731
                              if line.startswith("| ") and not line.startswith("| #")]
    assert trials_of(from_run) == trials_of(from_dir) and len(trials_of(from_dir)) == 3
    started = [t["started"] for t in json.loads((path / "trials.json").read_text())]
    assert all(isinstance(t, float) for t in started) and started == sorted(started)
    for out in ("dir", "run"):
        _png(tmp_path / out / "mu_fe.png")
        _png(tmp_path / out / "objective_history.png")


def test_unusable_store_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from raysweep.tune import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAYSWEEP_WORKER", FAKE_WORKER)  # should the check ever pass: a fast sweep
    space = write_yaml(tmp_path / "space.yaml", {"experiment": {"name": "cli", "training": {"epochs": 2}},
                                                 "search": {"methods": ["GA+GD"], "num_samples": 1}})
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(SystemExit) as info:
        main(["--space", str(space), "--storage", str(tmp_path / "results"),
              "--mlflow-uri", f"sqlite:///{tmp_path}/a_file/mlflow.db"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("20")]
    assert len(err) == 1 and err[0].startswith("error: --mlflow-uri: cannot open MLflow store"), err
    assert not ray.is_initialized()
