"""Old module path of :mod:`raysweep.sweep.trial` (and the trial helpers it used to hold).

Experiments started before the sweep layer moved pickled ``raysweep.trial.run_trial``;
``--resume`` of those (and existing imports) find the names here.
"""

from raysweep.sweep.cluster import worker_resources  # noqa: F401
from raysweep.sweep.results import GRID_KEY, PARAM_KEYS, sampled_params  # noqa: F401
from raysweep.sweep.space import trial_experiment  # noqa: F401
from raysweep.sweep.storage import is_remote  # noqa: F401
from raysweep.sweep.trial import (  # noqa: F401
    DEFAULT_WORKER, DIVERGED_FILE, FORWARDED_ENV_PREFIX, WORKER_ENV, RayReporter, TrialDiverged, TrialSetup,
    divergence_message, resolve_worker, run_trial, train_worker,
)
