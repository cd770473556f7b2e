"""The generations tables a trial's rank-0 worker logs every epoch on the trial's MLflow child
run (``generations/epoch_NNN.json``; ``step_NNN`` in the continual scenario), forget-set text
redacted when ``tracking.redact_forget``. The only MLflow code a Train worker imports."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from raysweep.sweep.mlflow_store import client_for, ensure_child_run, find_child, retrying, warn

GENERATIONS_DIR = "generations"
FORGET_SET = "forget"
SAMPLE_TEXT = ("question", "ground_truth", "generation")
MIN_LEAK_LEN = 8  # forget strings at least this long are also searched inside other sets' texts


def redact_text(text: Any) -> str:
    return "sha256:" + hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:16]



def generation_rows(samples: dict[str, list[dict]], redact_forget: bool = False) -> list[dict[str, Any]]:
    """The generations table: one row per evaluated question, ``set`` first.

    With ``redact_forget`` every text of the forget set, and any text of another set that
    contains a forget-set question or answer, is replaced by its hash (:func:`redact_text`).
    """
    forget_texts: set[str] = set()
    if redact_forget:
        for name, rows in samples.items():
            if _is_forget_set(name):
                for row in rows:
                    for key in ("question", "ground_truth"):
                        if row.get(key):
                            forget_texts.add(str(row[key]))
    long_texts = [t for t in forget_texts if len(t) >= MIN_LEAK_LEN]
    table = []
    for name, rows in samples.items():
        forget = _is_forget_set(name)
        for row in rows:
            out: dict[str, Any] = {"set": name}
            for key, value in row.items():
                if hasattr(value, "item") and not isinstance(value, (str, bytes)):
                    try:
                        value = value.item()
                    except (TypeError, ValueError):
                        value = str(value)
                if isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value, default=str)
                if redact_forget and isinstance(value, str) and (
                    (forget and key in SAMPLE_TEXT)
                    or value in forget_texts
                    or any(t in value for t in long_texts)
                ):
                    value = redact_text(value)
                out[key] = value
            table.append(out)
    return table


def _is_forget_set(name: str) -> bool:
    return name == FORGET_SET or name.startswith(FORGET_SET)


def generations_file(step: int, continual: bool = False) -> str:
    return f"{GENERATIONS_DIR}/{'step' if continual else 'epoch'}_{int(step):03d}.json"


class GenerationLogger:
    """Rank 0's per-epoch generations table on the trial's child run (see the module doc).

    ``info``: ``uri``, ``experiment_id``, ``parent_run_id``, ``trial_id``, ``params``,
    ``redact_forget``. Connects in a background thread; every failure is a warning, never an
    error of the trial.
    """

    def __init__(self, info: dict[str, Any], wait_s: float = 300.0):
        self.info = dict(info)
        self.wait_s = wait_s
        self.client = None
        self.run_id: str | None = None
        self.existing: set[str] = set()
        self._failed = False
        self._thread = threading.Thread(target=self._connect, name="raysweep-mlflow", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            info = self.info
            client = client_for(info["uri"])
            run = None
            for _ in range(4):  # the driver's callback created it before the trial started
                run = find_child(client, info["experiment_id"], info["parent_run_id"], info["trial_id"])
                if run is not None:
                    break
                time.sleep(0.5)
            if run is None:
                run, _ = ensure_child_run(client, info["experiment_id"], info["parent_run_id"],
                                          info["trial_id"], info.get("params") or {},
                                          info.get("experiment_path"))
            self.run_id = run.info.run_id
            self.existing = {a.path for a in client.list_artifacts(self.run_id, GENERATIONS_DIR)}
            self.client = client
        except Exception as err:  # noqa: BLE001
            self._failed = True
            warn(f"generations will not be logged ({type(err).__name__}: {err})")

    def log(self, step: int, samples: dict[str, list[dict]], continual: bool = False) -> str | None:
        """Log one epoch's table; returns its artifact path (None if skipped or failed)."""
        if not samples or self._failed:
            return None
        self._thread.join(self.wait_s)
        if self.client is None or self.run_id is None:
            return None
        path = generations_file(step, continual)
        if path in self.existing:  # logged by an earlier attempt of this trial
            return None
        try:
            rows = generation_rows(samples, bool(self.info.get("redact_forget")))
            if not rows:
                return None
            columns: list[str] = []
            for row in rows:
                columns += [k for k in row if k not in columns]
            data = {c: [row.get(c) for row in rows] for c in columns}
            retrying(self.client.log_table, self.run_id, data=data, artifact_file=path)
            self.existing.add(path)
            return path
        except Exception as err:  # noqa: BLE001
            warn(f"could not log {path} ({type(err).__name__}: {err})")
            return None

