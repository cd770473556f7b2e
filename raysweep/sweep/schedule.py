"""When a trial may be stopped early: the rung schedule and its guards (issue #16).

ASHA's rule, as Ray implements it (``ray.tune.schedulers.ASHAScheduler``, one bracket): rungs at
``grace x rf^k`` epochs below ``max_t``; a trial reaching a rung is stopped if its value is below
the ``1 - 1/rf`` quantile of the values recorded there by the trials that reached it earlier.
With two trials at a time that is fragile (docs/BENCHMARKS.md, "Why good configurations die
early"): the first arrivals at a rung set or skip the cut-off, and a rung inside the lr warm-up
judges on a signal that ranks trials backwards. The guards, each a ``search.scheduler`` key:

- ``grace_period: auto`` -- the first rung after the warm-up, ``ceil(warmup_epochs) + 1``
  capped at ``max_t`` (:func:`grace_epochs`);
- ``metric: best_so_far`` -- rungs compare ``objective_best`` (the trial's best objective so far,
  reported next to ``objective`` by :class:`raysweep.sweep.trial.RayReporter`) instead of the
  objective of the rung's epoch;
- ``keep_best_per_method`` -- a trial that is the best of its method at the first rung so far is
  never stopped there, so every method keeps one trial past it;
- ``revisit`` -- a running trial is judged again at every rung it passed, against all values
  recorded there since, so a first arrival's free pass ends once the rung has filled.

Without ``keep_best_per_method`` and ``revisit`` the sweep uses Ray's own ``ASHAScheduler``; with
either, :class:`RungScheduler` (ASHA's rule plus the guards; with both guards off it decides
exactly as Ray's, which the tests check).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raysweep.config import SweepConfig, fail
from raysweep.eval.schedule import rung_milestones

METRICS = {"last": "objective", "best_so_far": "objective_best"}


def time_attr(sweep: SweepConfig) -> str:
    """ASHA's clock: the reported ``epoch`` (the continual scenario: its ``step``), never Tune's
    count of reports, so the rungs stay right when a trial reports only some epochs
    (``eval.every: rungs``)."""
    return "step" if sweep.experiment.scenario == "continual" else "epoch"


def grace_epochs(sweep: SweepConfig, max_t: int) -> int:
    """The grace period in epochs: the YAML's integer, or for ``auto`` the first epoch after the
    lr warm-up, ``ceil(experiment.training.warmup_epochs) + 1``, capped at ``max_t`` (a sweep of
    trials too short to get past the warm-up is then not stopped early at all)."""
    grace = sweep.search.scheduler.grace_period
    if grace == "auto":
        return min(math.ceil(sweep.experiment.training.warmup_epochs) + 1, max_t)
    return int(grace)


def check_grace(sweep: SweepConfig, max_t: int, space_file: Any) -> None:
    """Exit 2 (one line naming the key) when a given grace period is beyond ``max_t``."""
    sched = sweep.search.scheduler
    if sched.type == "asha" and grace_epochs(sweep, max_t) > max_t:
        fail(space_file, "search.scheduler.grace_period",
             f"{sched.grace_period} is larger than max_t ({max_t} epochs)")


def rung_epochs(grace: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rungs of Ray's ASHA bracket, ascending, as epochs: the first epoch at or after each
    milestone ``grace x rf^k``, ``k < int(log(max_t / grace) / log(rf) + 1)``
    (:func:`raysweep.eval.schedule.rung_milestones`; Ray compares ``epoch < milestone``)."""
    return sorted({math.ceil(m) for m in rung_milestones(grace, reduction_factor, max_t)})


class RungScheduler(FIFOScheduler):
    """ASHA's rule (maximising ``metric`` per ``time_attr``: the reported epoch) with the issue #16
    guards.

    :meth:`decide` is the whole policy, on plain values, so that it can be tested without Ray.
    Like Ray's ASHA (``stop_last_trials=True``) a trial is stopped at ``max_t``.
    """

    def __init__(self, *, metric: str, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 keep_best_per_method: bool, revisit: bool):
        super().__init__()
        self._metric, self._mode, self._time_attr = metric, "max", time_attr
        self.max_t, self.rf = max_t, reduction_factor
        self.keep_best_per_method, self.revisit = keep_best_per_method, revisit
        self.rungs = rung_epochs(grace_period, reduction_factor, max_t)
        self.recorded: dict[int, dict[str, float]] = {rung: {} for rung in self.rungs}
        self.methods: dict[str, Any] = {}  # trial id -> method
        self.stopped: dict[str, tuple[int, str]] = {}  # trial id -> (epoch, why), for the record

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric is the scheduler's own (objective / objective_best), always "max"

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result[self._time_attr])
        if epoch >= self.max_t:
            return TrialScheduler.STOP
        return self.decide(trial.trial_id, (trial.config or {}).get("method"), epoch, float(result[self._metric]))

    def decide(self, trial_id: str, method: Any, epoch: int, value: float) -> str:
        """CONTINUE or STOP for ``trial_id`` (of ``method``) reporting ``value`` at ``epoch``."""
        self.methods[trial_id] = method
        for rung in reversed(self.rungs):  # the highest rung reached and not yet recorded
            at_rung = self.recorded[rung]
            if epoch < rung or trial_id in at_rung:
                continue
            stop = self._below_cutoff(trial_id, rung, value)
            at_rung[trial_id] = value
            if stop:
                return self._stop(trial_id, epoch, f"rung {rung}")
            break
        if self.revisit:
            for rung in self.rungs:
                own = self.recorded[rung].get(trial_id)
                if rung < epoch and own is not None and self._below_cutoff(trial_id, rung, own):
                    return self._stop(trial_id, epoch, f"rung {rung} revisited")
        return TrialScheduler.CONTINUE

    def _below_cutoff(self, trial_id: str, rung: int, value: float) -> bool:
        """ASHA's test against the other trials' values at ``rung``, unless the trial is its
        method's best there so far at the first rung (``keep_best_per_method``)."""
        others = {t: v for t, v in self.recorded[rung].items() if t != trial_id}
        if not others:
            return False
        if value >= np.nanpercentile(list(others.values()), (1 - 1 / self.rf) * 100):
            return False
        if self.keep_best_per_method and rung == self.rungs[0]:
            method = self.methods.get(trial_id)
            rivals = [v for t, v in others.items() if self.methods.get(t) == method]
            if all(value >= v for v in rivals):
                return False
        return True

    def _stop(self, trial_id: str, epoch: int, why: str) -> str:
        self.stopped[trial_id] = (epoch, why)
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {r}: {len(v)} recorded" for r, v in self.recorded.items())
        return f"RungScheduler ({self._metric}; {rungs}; {len(self.stopped)} stopped)"


def build_scheduler(sweep: SweepConfig, max_t: int):
    """The sweep's scheduler: None, Ray's ``ASHAScheduler`` (no guard), or :class:`RungScheduler`."""
    sched = sweep.search.scheduler
    if sched.type == "none":
        return None
    metric, grace = METRICS[sched.metric], grace_epochs(sweep, max_t)
    if sched.keep_best_per_method or sched.revisit:
        return RungScheduler(metric=metric, time_attr=time_attr(sweep), max_t=max_t, grace_period=grace, reduction_factor=sched.reduction_factor,
                             keep_best_per_method=sched.keep_best_per_method, revisit=sched.revisit)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=time_attr(sweep), metric=metric, mode="max", max_t=max_t, grace_period=grace,
                         reduction_factor=sched.reduction_factor)
