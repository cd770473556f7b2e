"""Ctrl-C is a normal way to stop a sweep (issue #18, item 2).

``python -m raysweep.tune`` runs as a subprocess in its own session with the fake worker; the
test waits until the first epoch report is in the fake worker's log, then sends SIGINT to the
whole process group, as a terminal's Ctrl-C does. Once: the sweep stops within ~30 s, every
MLflow run is terminal (the interrupted trial's child KILLED, the parent KILLED), the experiment
state is saved and the printed resume command completes the sweep. Twice: the driver exits at
once, and ``--resume`` still completes the sweep (the runs the hard exit left RUNNING are
reconciled).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import processes_with_tag, tagged_env
from test_tune import fake_env, fake_events, tail, write_yaml

SPACE = {
    "experiment": {"name": "stop", "training": {"lr": 1e-5, "epochs": 2}},
    "search": {"methods": ["ME+GD"], "space": {"lr": {"loguniform": [1e-6, 1e-4]}},
               "num_samples": 2, "max_concurrent": 1, "scheduler": {"type": "none"}},
}


def start_sweep(tmp_path: Path, env: dict, log_name: str) -> tuple[subprocess.Popen, list[str], Path]:
    space = write_yaml(tmp_path / "space.yaml", SPACE)
    args = ["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "exp",
            "--set", "tracking.log_generations=false"]
    log = tmp_path / log_name
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raysweep.tune", *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, args, log


def wait_for_first_epoch(proc: subprocess.Popen, tmp_path: Path, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(e["event"] == "epoch" for e in fake_events(tmp_path)):
            return
        time.sleep(0.2)
    kill_group(proc)
    pytest.fail("no epoch was reported before the sweep could be interrupted:\n" + tail(log))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, float]:
    started = time.time()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"the driver did not exit within {timeout:.0f} s of the SIGINT:\n" + tail(log))
    return code, time.time() - started


def mlflow_runs(env: dict) -> tuple[list, list]:
    from raysweep.sweep.mlflow_store import TAG_PARENT, client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    return ([r for r in runs if TAG_PARENT not in r.data.tags], [r for r in runs if TAG_PARENT in r.data.tags])


def resume_command(log: Path) -> list[str]:
    """The resume command the interrupted sweep printed (the line after "Resume with:")."""
    match = re.search(r"Resume with:\n\s*(python -m raysweep\.tune .*)\n", log.read_text())
    assert match, "no resume command printed:\n" + tail(log)
    return shlex.split(match.group(1))


def resume_and_check(tmp_path: Path, env: dict, command: list[str], path: Path) -> None:
    """The resumed sweep completes: every trial finished once, every MLflow run FINISHED."""
    assert command[:3] == ["python", "-m", "raysweep.tune"] and "--resume" in command
    log = tmp_path / "resume.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, tail(log)
    trials = json.loads((path / "trials.json").read_text())
    assert len(trials) == SPACE["search"]["num_samples"] and all(t["status"] == "TERMINATED" for t in trials)
    parents, children = mlflow_runs(env)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["raysweep.trial_id"] for c in children) == sorted(t["trial_id"] for t in trials)
    assert [r.info.status for r in parents + children] == ["FINISHED"] * (1 + len(trials))
    from raysweep.sweep.mlflow_store import client_for

    client = client_for(env["MLFLOW_TRACKING_URI"])
    for child in children:  # one point per epoch, also for the trial the stop interrupted
        assert [m.step for m in client.get_metric_history(child.info.run_id, "objective")] == [1, 2]


def assert_nothing_left(tag: str, log: Path, grace: float = 15) -> None:
    """No process of the stopped sweep (Ray, the trial, its Train worker) outlives the driver."""
    deadline = time.time() + grace
    while processes_with_tag(tag) and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: command_line(pid) for pid in processes_with_tag(tag)}
    assert not left, f"processes left after the driver exited: {left}\n" + tail(log)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_sigint_stops_cleanly_and_resume_completes(tmp_path):
    env, tag = tagged_env(fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="1.5"))
    proc, args, log = start_sweep(tmp_path, env, "first.log")
    path = tmp_path / "results" / "exp"
    wait_for_first_epoch(proc, tmp_path, log)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    code, seconds = wait_exit(proc, log, timeout=30)
    out = log.read_text()
    assert code == 130, tail(log)
    assert "Traceback" not in out, tail(log)
    assert "Tuner.restore(" not in out, "Ray's Python-API resume hint beside ours:\n" + tail(log)
    assert list(path.glob("experiment_state-*.json")), "the experiment state was not saved"
    assert_nothing_left(tag, log)  # trials stopped
    # Every MLflow run terminal: the interrupted trial's child run and the parent KILLED.
    parents, children = mlflow_runs(env)
    assert len(parents) == 1 and parents[0].info.status == "KILLED", [p.info.status for p in parents]
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
    command = resume_command(log)
    print(f"stopped {seconds:.1f} s after SIGINT; resume: {shlex.join(command)}")
    resume_and_check(tmp_path, env, command, path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_sigints_exit_at_once_and_resume_still_works(tmp_path):
    env, tag = tagged_env(fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="1.5"))
    proc, args, log = start_sweep(tmp_path, env, "first.log")
    path = tmp_path / "results" / "exp"
    wait_for_first_epoch(proc, tmp_path, log)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    code, seconds = wait_exit(proc, log, timeout=15)
    assert code == 130, tail(log)
    assert "Traceback" not in log.read_text(), tail(log)
    print(f"exited {seconds:.1f} s after the second SIGINT")
    assert_nothing_left(tag, log)  # Ray's processes share the driver's fate
    parents, children = mlflow_runs(env)  # the quick exit still ended the runs
    assert [r.info.status for r in parents + children] == ["KILLED"] * (1 + len(children))
    resume_and_check(tmp_path, env, resume_command(log), path)
