"""Old module path of :mod:`raysweep.sweep.tracking`, :mod:`raysweep.sweep.mlflow_store` and
:mod:`raysweep.sweep.generations`.

Experiments started before the sweep layer moved pickled ``raysweep.tracking.TrackingCallback``
with the Tuner; ``--resume`` of those (and existing imports) find the names here.
"""

from raysweep.sweep.generations import (  # noqa: F401
    FORGET_SET, GENERATIONS_DIR, MIN_LEAK_LEN, SAMPLE_TEXT, GenerationLogger, generation_rows, generations_file,
    redact_text,
)
from raysweep.sweep.mlflow_store import (  # noqa: F401
    RUN_FILE, TAG_EARLY, TAG_ERROR, TAG_METHOD, TAG_PARENT, TAG_PATH, TAG_ROLE, TAG_STATUS, TAG_TRIAL, child_runs,
    client_for, ensure_child_run, find_child, flatten, get_or_create_experiment, git_commit, log_metrics,
    logged_steps, numeric_metrics, resolve_tracking_uri, retrying, sanitize_key, sweep_params, trial_run_name,
    versions,
)
from raysweep.sweep.results import TUNE_KEYS, TUNE_TO_MLFLOW, result_step  # noqa: F401
from raysweep.sweep.tracking import NoTracker, SweepTracker, TrackingCallback, tune_callback  # noqa: F401

__all__ = [
    "GenerationLogger", "NoTracker", "SweepTracker", "TrackingCallback", "generation_rows", "redact_text",
    "resolve_tracking_uri", "sanitize_key", "tune_callback",
]
