"""Where a person finds a sweep in the MLflow UI, and what they see there.

MLflow 3.17's UI opens every experiment in its GenAI view ("Traces: 0 / No data available"):
the GenAI / Model training switch at the top left is a browser-wide setting (``localStorage``
``mlflow.workflowType``, default ``genai``), and this UI build ignores the experiment tag
``mlflow.experimentKind`` (its ``experimentKind`` comes from the switch). Only the URL
parameter ``workflowType=machine_learning`` opens an experiment in the classic runs view
without the person touching the switch. And the runs table shows no metric or parameter
column until the person picks them under **Columns**.

So at the end of a sweep :func:`announce` writes one MLflow *shared view* of the runs table
(the experiment tag ``mlflow.sharedViewState.<key>``, what the UI's own share button writes):
the columns objective, MU, FE and the trials' sampled parameters; and prints the direct URL
``<ui base>/#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key>``
(with the ``mlflow ui`` command that serves a local store). The parent run then expands into
its trials with the **+** next to its name.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any, Iterable

DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui --host 127.0.0.1`'s address
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + share key: the UI's shared runs-table views
METRIC_COLUMNS = ("objective", "MU", "FE")
PARAM_ORDER = ("method", "lr", "epochs", "forget_coeff", "reg_coeff", "beta")


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself for an http(s) store, else ``mlflow ui``'s."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local store (sqlite or a directory) on loopback; None for a server."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000"


def runs_url(base: str, experiment_id: str, share_key: str | None = None) -> str:
    """The direct URL of the experiment's runs view, in the UI's "Model training" mode."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{url}&viewStateShareKey={share_key}" if share_key else url


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI writes it: ``metrics.`objective```."""
    return f"{kind}.`{key}`"


def view_state(param_keys: Iterable[str]) -> dict[str, Any]:
    """The runs-table state of the sweep's shared view: objective/MU/FE and the sampled params
    after the fixed columns (run name, created, duration), instead of MLflow's default Source,
    Models and Dataset columns, which are empty for a sweep."""
    keys = set(param_keys)
    params = [k for k in PARAM_ORDER if k in keys] + sorted(keys - set(PARAM_ORDER))
    return {
        "selectedColumns": [*(column("metrics", m) for m in METRIC_COLUMNS),
                            *(column("params", p) for p in params)],
    }


def share_key(state: dict[str, Any]) -> str:
    text = json.dumps(state, sort_keys=True)
    return "raysweep-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_shared_view(client: Any, experiment_id: str, param_keys: Iterable[str]) -> str:
    """Writes the sweep's shared view as an experiment tag; returns its share key."""
    state = view_state(param_keys)
    key = share_key(state)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def announce(tracker: Any, out=None) -> str | None:
    """End of a sweep: write the shared view and print how to open the runs view. Returns the URL.

    ``tracker`` is a started ``SweepTracker`` (``uri``, ``experiment_id``, ``parent_run_id``);
    anything else (tracking off) prints nothing. A tracking failure is a warning, never an error.
    """
    import sys

    out = out or sys.stdout
    uri, experiment_id = getattr(tracker, "uri", None), getattr(tracker, "experiment_id", None)
    if not uri or not experiment_id:
        return None
    key = None
    try:
        from raysweep.sweep.mlflow_store import child_runs, client_for, retrying

        client = client_for(uri)
        children = child_runs(client, experiment_id, tracker.parent_run_id) if tracker.parent_run_id else []
        params = {k for run in children for k in run.data.params}
        key = retrying(write_shared_view, client, experiment_id, params)
    except Exception as err:  # noqa: BLE001 - the URL without the view still opens the runs
        print(f"warning: MLflow tracking: the runs-table view could not be saved: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
    url = runs_url(ui_base(uri), experiment_id, key)
    command = ui_command(uri)
    print(f"\nMLflow runs view (parent run expands into its trials; select two → Compare): {url}", file=out)
    if command:
        print(f"  (serve the store first: {command})", file=out)
    out.flush()
    return url


__all__ = ["announce", "runs_url", "ui_base", "ui_command", "view_state", "write_shared_view"]
