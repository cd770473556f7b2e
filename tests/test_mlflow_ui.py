"""The MLflow UI as a person sees it after a sweep (``raysweep.sweep.mlflow_ui``).

A finished fake-worker sweep prints the direct URL of its runs view; ``mlflow ui`` serves its
store on 127.0.0.1 (a free port) and headless Chromium (Debian's ``chromium``, driven by
Playwright for Python; ``.ci/run`` installs it) opens that URL in a fresh profile, as a person
would: the runs view in "Model training" mode (not the GenAI overview), the parent run that
expands into its trials, the objective/MU/FE columns; then two trials → **Compare** and its
parallel-coordinates plot. A screenshot of each view is saved under
``$RAYSWEEP_TEST_ARTIFACTS/mlflow_ui`` (default: the test's tmp directory); the README shows
``docs/img/mlflow_runs.png``, taken from it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from raysweep.sweep.mlflow_ui import SHARED_VIEW_TAG, announce, runs_url, ui_base, ui_command, view_state
from raysweep.tracking import TAG_PARENT, client_for

from test_tune import fake_env, run_cli, tail, write_yaml

URL_LINE = re.compile(r"^MLflow runs view .*?: (http\S+)$", re.MULTILINE)
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
WAIT_MS = 60_000  # the UI's first load on a busy 2-core machine


# ----------------------------------------------------------------------------- no browser


def test_runs_url_opens_model_training_mode_and_the_shared_view():
    assert runs_url("http://127.0.0.1:5000", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_url("https://mlflow.example:8443/", "7", "raysweep-ab") == \
        "https://mlflow.example:8443/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=raysweep-ab"
    assert ui_base("sqlite:////tmp/x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base("http://10.0.0.5:5000/") == "http://10.0.0.5:5000"
    assert ui_command("sqlite:////tmp/x y/mlflow.db") == \
        "mlflow ui --backend-store-uri 'sqlite:////tmp/x y/mlflow.db' --host 127.0.0.1 --port 5000"
    assert ui_command("http://10.0.0.5:5000") is None


def test_view_state_columns_are_the_objective_and_the_sampled_params():
    state = view_state({"lr", "beta", "method", "epochs", "extra_knob"})
    assert state["selectedColumns"] == [
        "metrics.`objective`", "metrics.`MU`", "metrics.`FE`",
        "params.`method`", "params.`lr`", "params.`epochs`", "params.`beta`", "params.`extra_knob`",
    ]


def test_announce_without_tracking_prints_nothing():
    out = io.StringIO()
    assert announce(SimpleNamespace(), out=out) is None  # NoTracker: tracking.enabled false
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------- a sweep, a server, a browser


UI_SWEEP = {
    "experiment": {"name": "ui", "training": {"lr": 1e-5, "epochs": 2}},
    "search": {
        "methods": ["NPO+GD", "GA+GD"],
        "space": {"lr": {"loguniform": [1e-6, 1e-4]}, "epochs": 2, "forget_coeff": {"uniform": [0.05, 1.0]},
                  "beta": {"loguniform": [0.05, 0.5]}},
        "num_samples": 3,
        "max_concurrent": 2,
        "seed": 3,
    },
    "tracking": {"experiment": "ui-sweep"},
}


@pytest.fixture(scope="module")
def ui_sweep(tmp_path_factory):
    """A finished 3-trial fake-worker sweep (NPO+GD, GA+GD) tracked in a sqlite store."""
    tmp = tmp_path_factory.mktemp("ui_sweep")
    space = write_yaml(tmp / "space.yaml", UI_SWEEP)
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = fake_env(tmp, RAYSWEEP_FAKE_SLEEP="0.2", MLFLOW_TRACKING_URI=uri)
    log = tmp / "driver.log"
    proc = run_cli(["--space", str(space), "--storage", str(tmp / "results"), "--name", "sweep"], env, log)
    assert proc.returncode == 0, tail(log)
    client = client_for(uri)
    experiment = client.get_experiment_by_name("ui-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if TAG_PARENT not in r.data.tags)
    children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
    assert len(children) == 3
    return SimpleNamespace(tmp=tmp, uri=uri, log=log, output=log.read_text(errors="replace"),
                           experiment_id=experiment.experiment_id, parent=parent, children=children)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(ui_sweep):
    """``mlflow ui`` over the sweep's store on 127.0.0.1:<free port>, in its own process group,
    stopped (the whole group, its job consumers included) at the end."""
    port = _free_port()
    log = open(ui_sweep.tmp / "mlflow_ui.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey consumers
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ui_sweep.uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=ui_sweep.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow ui did not start:\n{tail(ui_sweep.tmp / 'mlflow_ui.log')}")
            time.sleep(0.5)
        yield SimpleNamespace(base=base, port=port, pgid=proc.pid)
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 20
        while _alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        assert not _alive(proc.pid), "mlflow ui left processes behind"


@pytest.fixture
def artifact_dir(tmp_path):
    root = os.environ.get("RAYSWEEP_TEST_ARTIFACTS")
    path = Path(root) / "mlflow_ui" if root else tmp_path / "mlflow_ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install -e '.[test]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_sweep_prints_its_runs_view_url(ui_sweep):
    urls = URL_LINE.findall(ui_sweep.output)
    assert urls, "the sweep printed no MLflow runs-view URL:\n" + ui_sweep.output[-3000:]
    url = urls[-1]
    prefix = f"http://127.0.0.1:5000/#/experiments/{ui_sweep.experiment_id}/runs?workflowType=machine_learning"
    assert url.startswith(prefix + "&viewStateShareKey=raysweep-"), url
    assert f"mlflow ui --backend-store-uri {ui_sweep.uri} --host 127.0.0.1" in ui_sweep.output
    key = url.split("viewStateShareKey=")[1]
    state = json.loads(client_for(ui_sweep.uri).get_experiment(ui_sweep.experiment_id).tags[SHARED_VIEW_TAG + key])
    columns = state["selectedColumns"]
    assert columns[:3] == ["metrics.`objective`", "metrics.`MU`", "metrics.`FE`"]
    assert {"params.`method`", "params.`lr`", "params.`epochs`", "params.`forget_coeff`", "params.`beta`"} <= set(columns)


def _header(page, column_id: str):
    return page.locator(f'.ag-header-cell[col-id="{column_id}"]')


def _row(page, run_id: str):
    return page.locator(f'.ag-pinned-left-cols-container [row-id="{run_id}"], '
                        f'.ag-center-cols-container [row-id="{run_id}"]').first


@pytest.mark.slow
def test_a_person_opens_the_printed_url_sees_the_sweep_and_compares_two_trials(
        browser, ui_sweep, mlflow_server, artifact_dir):  # browser first: no chromium, skip before the server
    urls = URL_LINE.findall(ui_sweep.output)
    assert urls, "the sweep printed no MLflow runs-view URL:\n" + ui_sweep.output[-3000:]
    url = urls[-1].replace("http://127.0.0.1:5000", mlflow_server.base)
    started = time.time()
    context = browser.new_context(viewport={"width": 1800, "height": 900})  # a fresh profile: GenAI default
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)

    page.goto(url)
    parent = ui_sweep.parent.info.run_id
    _row(page, parent).wait_for()
    # The runs view in "Model training" mode, not the GenAI overview ("Traces: 0 / No data available").
    text = page.inner_text("body")
    assert "No data available" not in text and "Training runs" not in text and "Judges" not in text
    assert "Model registry" in text
    page.get_by_role("heading", name="Runs", exact=True).wait_for()
    if page.get_by_role("button", name="Close").count():  # MLflow's assistant panel opens on first visit
        page.get_by_role("button", name="Close").first.click()

    # objective / MU / FE are columns of the table (MLflow shows none by default), so are the params.
    for column in ("metrics.`objective`", "metrics.`MU`", "metrics.`FE`", "params.`method`", "params.`lr`"):
        _header(page, column).first.wait_for()
    # The parent run lists its trials: collapsed, only the parent; expanded, the three trials.
    children = sorted(ui_sweep.children, key=lambda r: r.info.run_name)
    assert page.locator(".ag-center-cols-container .ag-row").count() == 1
    _row(page, parent).locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').click()
    for child in children:
        row = _row(page, child.info.run_id)
        row.wait_for()
        assert child.info.run_name[:8] in row.inner_text()  # "NPO+GD-…" / "GA+GD-…" (names are cut)
    assert page.locator(".ag-center-cols-container .ag-row").count() == 1 + len(children)
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifact_dir / "runs_view.png"))

    # Two trials → Compare: the parallel-coordinates plot of their params and a chosen metric.
    # (Two trials of different lr: the plot's axes are params that differ, then a metric.)
    by_lr = sorted(children, key=lambda r: float(r.data.params["lr"]))
    pair = [by_lr[0], by_lr[-1]]
    assert pair[0].data.params["lr"] != pair[1].data.params["lr"], "the sweep sampled one lr only"
    differing = {k for k in {*pair[0].data.params, *pair[1].data.params}
                 if pair[0].data.params.get(k) != pair[1].data.params.get(k)}
    for child in pair:
        _row(page, child.info.run_id).locator("input.ag-checkbox-input").check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url(re.compile(r"#/compare-runs\?"))
    for child in pair:
        assert child.info.run_id in page.url
    plot = page.locator(".js-plotly-plot .parcoords").first
    plot.wait_for()
    axes = page.locator(".parcoords .axis-title").all_text_contents()
    metrics = {"objective", "MU", "FE", "epoch", "forget/ROUGE"}
    assert "lr" in axes and set(axes) - differing <= metrics and set(axes) & metrics, (axes, differing)
    page.locator(".du-bois-light-select-selector").nth(1).click()  # Metrics: add objective
    page.locator(".du-bois-light-select-item-option", has_text="objective").first.click()
    page.keyboard.press("Escape")
    page.wait_for_function("() => [...document.querySelectorAll('.parcoords .axis-title')]"
                           ".some(e => e.textContent === 'objective')")
    assert page.locator(".parcoords .axis-title").count() == len(axes) + 1
    page.screenshot(path=str(artifact_dir / "compare_view.png"))
    context.close()
    print(f"MLflow UI screenshots in {artifact_dir} (browser part: {time.time() - started:.0f} s)")
