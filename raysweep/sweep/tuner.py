"""The Tune ``Tuner`` of a sweep: a new one (searcher, scheduler, progress table, callbacks,
trial names) or, on ``--resume``, the one restored from the experiment directory; the
trainable is :func:`raysweep.sweep.trial.run_trial` on one ``trial_driver`` slot.

The console (:mod:`raysweep.sweep.console`): its callback's lines always; Tune's status table and
per-result lines only with ``verbose`` (``--verbose``). Tune pickles both with the Tuner, so a
``--resume`` prints what the sweep's first run chose."""

from __future__ import annotations

from typing import Any

from raysweep.config import SweepConfig
from raysweep.sweep.cluster import TRIAL_DRIVER
from raysweep.sweep.console import ConsoleCallback
from raysweep.sweep.space import (
    SpaceBuilder, build_reporter, build_scheduler, build_searcher, num_samples, param_space, trial_dirname,
)
from raysweep.sweep.tracking import tune_callbacks
from raysweep.sweep.trial import TrialSetup, run_trial


def trainable(sweep: SweepConfig, experiment_path: str, tracking: dict[str, Any] | None):
    """``run_trial`` with its :class:`TrialSetup`, on one ``trial_driver`` slot and no CPU."""
    from ray import tune

    setup = TrialSetup.from_sweep(sweep, experiment_path, tracking=tracking)
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {TRIAL_DRIVER: 1, "CPU": 0})


def make_tuner(sweep: SweepConfig, storage: str, name: str, tracking: dict[str, Any] | None, resume: bool,
               verbose: bool = True):
    """The sweep's Tuner (Ray must be running)."""
    from ray import tune

    experiment_path = f"{storage}/{name}"
    fn = trainable(sweep, experiment_path, tracking)
    if resume:
        return tune.Tuner.restore(experiment_path, trainable=fn, resume_errored=True)
    space = SpaceBuilder(sweep)
    return tune.Tuner(
        fn,
        param_space=param_space(sweep, space),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(sweep, space), scheduler=build_scheduler(sweep, space),
            num_samples=num_samples(sweep), trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname, reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=sweep.search.max_failures),
            progress_reporter=build_reporter(sweep, space) if verbose else None,
            callbacks=[*tune_callbacks(sweep, experiment_path), ConsoleCallback(sweep.search.scheduler.type)],
            # 2: Tune's status tables and a line per result (not every result dict); 0: none of
            # Tune's own output, the ConsoleCallback's lines only.
            verbose=2 if verbose else 0,
        ),
    )
