"""The console a person reads (``raysweep.sweep.console``) and ``python -m raysweep.prepare``'s
progress bars.

* The callback's lines on hand-made trials (no Ray running): one line per event and the progress
  line, routed by :class:`SweepLog` to stdout and the log file.
* A fake-worker sweep (``tests/fake_worker.py``, as in ``test_tune.py``): the header, one line per
  trial event, the progress line, no Tune status table and no Ray/worker line on the console, all
  of them in ``<experiment>/raysweep.log``; and ``--verbose`` printing them on the console again.
* The embedded build's tqdm bars, from its training subprocesses.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from raysweep.sweep.console import ConsoleCallback, SweepLog, header, params_text
from raysweep.sweep.tracking import NoTracker

from test_tune import E2E, fake_env, run_cli, tail, write_yaml


def trial(trial_id: str, status: str = "RUNNING", epochs: int = 3, last: dict | None = None,
          error_file: str | None = None, **params):
    config = {"method": "NPO+GD", "lr": 1e-4, "epochs": epochs, "forget_coeff": 0.5, "beta": 0.1, **params,
              "NPO+GD": {"lr": 1e-4}}  # Optuna's namespaced copy: not a parameter of the line
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, last_result=last or {},
                           error_file=error_file, num_failures=1)


@pytest.fixture
def sweep_log(tmp_path):
    log = SweepLog(str(tmp_path / "exp" / "raysweep.log")).start()
    yield log
    log.close()


def test_callback_prints_one_line_per_event_and_the_progress_line(tmp_path, sweep_log, capsys):
    cb = ConsoleCallback("asha", heartbeat_s=3600)
    cb.setup(total_num_samples=4)
    a, b, c = trial("a_00000"), trial("a_00001"), trial("a_00002", epochs=2)
    trials = [a, b, c]
    for t in trials:
        cb.on_trial_start(0, trials, t)
    cb.on_step_end(0, trials)
    cb.on_trial_result(0, trials, a, {"epoch": 1, "objective": 0.61234, "MU": 0.5, "FE": 0.72468,
                                      "forget/ROUGE": 0.3, "training_iteration": 1})
    cb.on_step_end(0, trials)  # a best now: a new progress line
    cb.on_step_end(0, trials)  # nothing changed: no line
    a.status, a.last_result = "TERMINATED", {"epoch": 1}
    cb.on_trial_complete(0, trials, a)  # 1 of 3 epochs: stopped by ASHA
    c.status, c.last_result = "TERMINATED", {"epoch": 2}
    cb.on_trial_complete(0, trials, c)  # all of its 2 epochs
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at x)\nTraceback ...\nValueError: first\n"
                     "Failure # 2 (occurred at y)\nTraceback ...\nRuntimeError: worker died\n")
    b.error_file = str(error)
    cb.on_trial_recover(0, trials, b)
    b.status = "ERROR"
    cb.on_trial_error(0, trials, b)
    cb.on_step_end(0, trials)
    out = capsys.readouterr().out
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in out.splitlines()]

    assert "trial a_00000 started: NPO+GD lr=0.0001 epochs=3 α=0.5 β=0.1" in lines
    assert sum(line.endswith("started: NPO+GD lr=0.0001 epochs=2 α=0.5 β=0.1") for line in lines) == 1
    assert "trial a_00000 epoch 1/3: objective 0.6123  MU 0.5000  FE 0.7247" in lines
    assert "trial a_00000 stopped early by ASHA after epoch 1 of 3 (best objective 0.6123 at epoch 1)" in lines
    assert "trial a_00002 finished after epoch 2" in lines  # no result seen: no best
    assert "trial a_00001 failed, retrying (failure 1): RuntimeError: worker died" in lines
    assert f"trial a_00001 errored: RuntimeError: worker died (traceback: {error})" in lines
    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress[0].startswith("progress: 0/4 done | 3 running | 1 pending | best: none yet | ")
    assert progress[1].startswith("progress: 0/4 done | 3 running | 1 pending | best 0.6123 (trial a_00000, "
                                  "NPO+GD, epoch 1) | ")
    assert progress[-1].startswith("progress: 3/4 done (1 stopped early, 1 errored) | 0 running | 1 pending | ")
    assert len(progress) == 3, progress  # a line when something changed, not at every step

    # The log file has the same lines and every metric of the result (the console only three).
    logged = Path(sweep_log.path).read_text()
    assert "trial a_00000 stopped early by ASHA" in logged and "forget/ROUGE" in logged
    assert "forget/ROUGE" not in out


def test_ray_logs_go_to_the_log_file_and_errors_stay_on_the_console(sweep_log, capsys):
    ray_logger = logging.getLogger("ray.tune.tune")
    ray_logger.info("Wrote the latest version of all result files")
    ray_logger.warning("some Ray warning")
    ray_logger.error("Experiment state snapshotting failed:\nTraceback (most recent call last): ...")
    logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed for trial x_1")
    captured = capsys.readouterr()
    assert "Wrote the latest" not in captured.err + captured.out and "some Ray warning" not in captured.err
    assert captured.err.strip() == "Ray: Experiment state snapshotting failed: (more in the log file)"
    logged = Path(sweep_log.path).read_text()
    for text in ("Wrote the latest", "some Ray warning", "Traceback (most recent call last)", "x_1"):
        assert text in logged

    # The workers' lines Ray forwards: all in the file; raysweep's own warnings once on stderr.
    sweep_log._worker_lines({"pid": 42, "ip": "10.0.0.1", "actor_name": "RayTrainWorker", "is_err": True,
                             "lines": ["INFO noise", "warning: eval.nli_model is null: ES is not computed"]})
    sweep_log._worker_lines({"pid": 43, "ip": "10.0.0.1", "task_name": "", "is_err": True,
                             "lines": ["warning: eval.nli_model is null: ES is not computed"]})
    err = capsys.readouterr().err
    assert err.count("ES is not computed") == 1 and "INFO noise" not in err
    logged = Path(sweep_log.path).read_text()
    assert "(RayTrainWorker pid=42, ip=10.0.0.1) stderr: INFO noise" in logged
    assert logged.count("ES is not computed") == 2


def test_close_gives_ray_its_console_back(tmp_path):
    ray_logger = logging.getLogger("ray")
    import ray  # noqa: F401 - configures the "ray" logger

    before = list(ray_logger.handlers)
    log = SweepLog(str(tmp_path / "raysweep.log")).start()
    assert not set(before) & set(ray_logger.handlers)
    log.close()
    assert ray_logger.handlers == before


def test_header_names_the_experiment_its_directory_log_and_mlflow(tmp_path):
    from raysweep.config import SweepConfig

    sweep = SweepConfig.model_validate(E2E)
    tracker = SimpleNamespace(uri="sqlite:////tmp/x/mlflow.db", experiment_id="7",
                              url=lambda: "experiment 7, parent run abc in sqlite:////tmp/x/mlflow.db")
    text = header("sweep", "/r/sweep", "space.yaml", sweep, tracker, "/r/sweep/raysweep.log", verbose=False)
    assert text.splitlines()[0] == ("Sweep sweep (space.yaml): 4 trial(s) of NPO+GD, GA+GD, 1 at a time, "
                                    "optuna + ASHA early stopping")
    assert "  experiment dir: /r/sweep" in text and "  log file:       /r/sweep/raysweep.log" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text
    assert "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in text
    assert "MLflow: off" in header("s", "/r/s", "f", sweep, NoTracker(), "/r/s/raysweep.log", verbose=True)
    assert params_text({"grid_point": {"method": "GA+GD", "lr": 1e-5, "epochs": 2}}) == "GA+GD lr=1e-05 epochs=2"


# ----------------------------------------------------------------------------- a fake-worker sweep

STATUS_TABLE = re.compile(r"Trial status:|\| Trial name|\+-{5,}")  # Tune's CLIReporter table


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fake_worker_sweep_console_and_log_file(tmp_path):
    # test_tune's E2E sweep, one trial at a time, cut to 3 trials: NPO+GD's default finishes, GA+GD's
    # diverges at epoch 2, and ASHA stops the third (a GA+GD, far below them) after epoch 1.
    space = write_yaml(tmp_path / "space.yaml", {**E2E, "search": {**E2E["search"], "num_samples": 3}})
    env = fake_env(tmp_path, RAYSWEEP_FAKE_DIVERGE_LR="1e-5", RAYSWEEP_FAKE_DIVERGE_METHOD="GA+GD",
                   RAYSWEEP_FAKE_SLEEP="0.2")
    args = ["--space", str(space), "--storage", str(tmp_path / "results"), "--set", "tracking.log_generations=false"]
    proc = run_cli([*args, "--name", "quiet"], env, tmp_path / "quiet.log")
    out = (tmp_path / "quiet.log").read_text()
    assert proc.returncode == 0, tail(tmp_path / "quiet.log")
    experiment = tmp_path / "results" / "quiet"
    log_file = experiment / "raysweep.log"

    # The header, before any trial.
    head = out[: out.index(" started: ")]
    assert f"Sweep quiet ({space}): 3 trial(s) of NPO+GD, GA+GD" in head
    assert f"experiment dir: {experiment}" in head and f"log file:       {log_file}" in head
    assert "MLflow UI:      http://127.0.0.1:5000/#/experiments/" in head

    # One line per trial event.
    assert len(re.findall(r"\] trial \w+ started: (NPO\+GD|GA\+GD) lr=", out)) == 3
    assert re.search(r"\] trial \w+ epoch 1/3: objective 0\.\d{4}  MU 0\.\d{4}  FE 0\.\d{4}", out)
    assert len(re.findall(r"\] trial \w+ stopped early by ASHA after epoch \d of 3", out)) >= 1
    assert len(re.findall(r"\] trial \w+ finished after epoch 3", out)) >= 1
    assert re.search(r"\] trial \w+ errored: DivergenceError: loss became nan at epoch 2", out)
    progress = re.findall(r"\] progress: (\d)/3 done.* \| (\d) running \| (\d) pending \| best .*elapsed", out)
    assert progress and progress[-1] == ("3", "0", "0")
    assert "Results (sorted by objective" in out  # the final table

    # None of Tune's status tables, Ray's INFO lines, or the workers' lines on the console.
    assert not STATUS_TABLE.search(out), out
    assert " reported " not in out and "INFO" not in out and "pid=" not in out and "Ray: " not in out
    assert "forget/ROUGE" not in out

    # ... they are in the log file.
    logged = log_file.read_text()
    assert re.search(r" INFO +ray[.\w]*: ", logged)  # Ray's own logger
    assert re.search(r"\((TrainController|RayTrainWorker|ImplicitFunc)\w* pid=\d+", logged)  # worker output
    assert "forget/ROUGE" in logged  # the full metrics of every result
    assert "stopped early by ASHA" in logged

    # --verbose: everything on the console again (today's output), the log file all the same.
    proc = run_cli([*args, "--name", "loud", "--verbose", "--set", "search.num_samples=1"], env,
                   tmp_path / "loud.log")
    loud = (tmp_path / "loud.log").read_text()
    assert proc.returncode == 0, tail(tmp_path / "loud.log")
    assert STATUS_TABLE.search(loud) and "| method" in loud
    assert " reported " in loud and "pid=" in loud
    assert "] trial " in loud and (tmp_path / "results" / "loud" / "raysweep.log").is_file()


# ----------------------------------------------------------------------------- prepare's bars


def test_embedded_build_shows_a_progress_bar_per_model(embedded_specs, tmp_path, capfd):
    from raysweep import prepare
    from raysweep.data.records import QARecord
    from raysweep.models import train_tokenizer

    records = [QARecord(question=f"Who wrote book {i}?", answer=f"Author {i} wrote it.") for i in range(16)]
    spec = embedded_specs.model.model_copy(update={"min_epochs": 1, "max_epochs": 2, "batch_size": 8,
                                                   "eval_samples": 4, "max_new_tokens": 4})
    tokenizer = train_tokenizer([r.question + " " + r.answer for r in records], spec.vocab_size)
    logged: list[str] = []
    bars = prepare._ProgressLog(logged.append)  # what _build hands the training (here: in this process)
    try:
        prepare.train_model(spec, tokenizer, records, log=bars, name="target")
        prepare.train_model(spec, tokenizer, records[:8], log=bars, name="retain")
    finally:
        bars.close()
    err = capfd.readouterr().err
    # tqdm's bars: steps done of the most max_epochs allow, and the time left (ETA).
    assert re.search(r"\[prepare\] target: 100%\|.*\| 4/4 \[\d\d:\d\d<00:00", err), err
    assert re.search(r"\[prepare\] retain: 100%\|.*\| 2/2 \[", err), err
    assert any(line.startswith("[prepare] target epoch 1:") for line in logged)

    # A training subprocess sends its steps to the parent's bars on stdout (_train_parallel reads them).
    prepare._ChildLog().progress("target", 3, 40)
    assert capfd.readouterr().out == "@@raysweep-progress target 3 40\n"


def test_verbose_leaves_ray_on_the_console_and_writes_the_log_file(tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raysweep.config import SweepConfig
    from raysweep.sweep.tuner import make_tuner
    from raysweep.tune import parse_args

    assert parse_args(["--space", "s.yaml", "--verbose"]).verbose and not parse_args(["--space", "s.yaml"]).verbose
    printed: list[dict] = []
    dispatcher.add_handler("ray_print_logs", printed.append)  # Ray's printer, as ray.init adds it
    ray_console = list(logging.getLogger("ray").handlers)  # Ray's own console handler
    assert ray_console
    try:
        for verbose in (True, False):
            log = SweepLog(str(tmp_path / f"verbose-{verbose}.log"), verbose=verbose).start()
            log.attach_workers()
            assert (set(ray_console) <= set(logging.getLogger("ray").handlers)) == verbose
            logging.getLogger("ray.tune").info(f"a Tune status line ({verbose})")
            dispatcher.emit({"pid": 1, "ip": "x", "is_err": False, "lines": [f"a worker line ({verbose})"]})
            log.close()
            assert (printed[-1]["lines"] == [f"a worker line ({verbose})"]) == verbose
            logged = (tmp_path / f"verbose-{verbose}.log").read_text()
            assert f"a Tune status line ({verbose})" in logged and f"a worker line ({verbose})" in logged
        assert ("ray_print_logs", printed.append) in dispatcher.handlers  # given back by close()
    finally:
        dispatcher.remove_handler("ray_print_logs")

    # Tune's own output: the status table and a line per result with --verbose, none without.
    sweep = SweepConfig.model_validate(E2E)
    for verbose, tune_verbose in ((True, 2), (False, 0)):
        run_config = make_tuner(sweep, str(tmp_path / "r"), f"v{verbose}", None, False,
                                verbose=verbose)._local_tuner.get_run_config()
        assert run_config.verbose == tune_verbose
        assert (run_config.progress_reporter is not None) == verbose
        assert any(isinstance(cb, ConsoleCallback) for cb in run_config.callbacks)
