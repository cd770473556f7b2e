"""Issue #16's search guards, unit level: grace after the warm-up, the rung scheduler (ASHA's rule,
per-method floor, revisited rungs, best-so-far metric) and de-duplicated proposals. The same
options through Tune on the fake worker: tests/test_tune.py::test_search_guards_through_tune."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from raysweep.config import SweepConfig
from raysweep.sweep.schedule import RungScheduler, build_scheduler, grace_epochs, rung_epochs
from raysweep.sweep.space import DedupeSearcher, SpaceBuilder, build_searcher, check_scheduler, config_key

CONTINUE, STOP = "CONTINUE", "STOP"


def sweep(search: dict | None = None, warmup: float = 1.0) -> SweepConfig:
    return SweepConfig.model_validate({"experiment": {"training": {"warmup_epochs": warmup}}, "search": search or {}})


@pytest.mark.parametrize("warmup, grace", [(0.0, 1), (0.5, 2), (1.0, 2), (1.5, 3), (2.0, 3)])
def test_auto_grace_is_the_first_epoch_after_the_warm_up(warmup, grace):
    assert grace_epochs(sweep(warmup=warmup), max_t=5) == grace
    assert grace_epochs(sweep(warmup=warmup), max_t=2) == min(grace, 2)  # capped: no rung past the end
    assert grace_epochs(sweep({"scheduler": {"grace_period": 1}}, warmup=warmup), max_t=5) == 1  # a number is kept


def test_a_grace_period_beyond_max_t_exits_2_naming_the_key(capsys):
    with pytest.raises(SystemExit) as info:
        check_scheduler(sweep({"space": {"epochs": 2}, "scheduler": {"grace_period": 3}}), "space.yaml")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: space.yaml: search.scheduler.grace_period: 3 is larger than max_t (2 epochs)"]
    check_scheduler(sweep({"space": {"epochs": 2}}, warmup=1.5), "space.yaml")  # auto: capped at 2
    check_scheduler(sweep({"space": {"epochs": 2}, "scheduler": {"type": "none", "grace_period": 3}}), "space.yaml")


def test_the_scheduler_built_for_each_option():
    from ray.tune.schedulers import ASHAScheduler

    plain = build_scheduler(sweep({"scheduler": {"keep_best_per_method": False}}), max_t=5)
    assert isinstance(plain, ASHAScheduler) and plain._metric == "objective"
    assert [r[0] for r in plain._brackets[0]._rungs] == [4, 2]  # auto grace 2, rf 2, max_t 5
    smooth = build_scheduler(sweep({"scheduler": {"keep_best_per_method": False, "metric": "best_so_far"}}), 5)
    assert isinstance(smooth, ASHAScheduler) and smooth._metric == "objective_best"
    guarded = build_scheduler(sweep({"scheduler": {"revisit": True, "metric": "best_so_far"}}), max_t=5)
    assert isinstance(guarded, RungScheduler) and guarded._metric == "objective_best"
    assert guarded.rungs == [2, 4] and guarded.keep_best_per_method and guarded.revisit
    assert build_scheduler(sweep({"scheduler": {"type": "none"}}), max_t=5) is None


def _trial(trial_id: str, method: str = "ME+GD") -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"method": method})


def test_without_guards_the_rung_scheduler_decides_as_rays_asha():
    from ray.tune.schedulers import ASHAScheduler

    rng = random.Random(0)
    for case in range(20):
        grace, rf, max_t = rng.choice([1, 2]), rng.choice([2, 3]), rng.choice([4, 5, 9])
        ours = RungScheduler(metric="objective", max_t=max_t, grace_period=grace, reduction_factor=rf,
                             keep_best_per_method=False, revisit=False)
        ray_asha = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="max", max_t=max_t,
                                 grace_period=grace, reduction_factor=rf)
        running = {f"t{i}": 1 for i in range(8)}
        for trial_id in running:
            ray_asha.on_trial_add(None, _trial(trial_id))
        decisions = 0
        while running:  # results arrive interleaved, at random, as with concurrent trials
            trial_id = rng.choice(sorted(running))
            epoch = running[trial_id]
            result = {"training_iteration": epoch, "objective": rng.random()}
            mine = ours.on_trial_result(None, _trial(trial_id), result)
            assert mine == ray_asha.on_trial_result(None, _trial(trial_id), result), (case, trial_id, epoch)
            decisions += mine == STOP
            if mine == STOP or epoch >= max_t:
                del running[trial_id]
                ray_asha.on_trial_complete(None, _trial(trial_id), result)
            else:
                running[trial_id] = epoch + 1
        assert decisions > 0


def test_keep_best_per_method_protects_each_methods_leader_at_the_first_rung_only():
    def scheduler(keep: bool) -> RungScheduler:
        s = RungScheduler(metric="objective", max_t=5, grace_period=2, reduction_factor=2,
                          keep_best_per_method=keep, revisit=False)
        assert s.rungs == [2, 4]
        assert s.decide("npo1", "NPO+GD", 2, 0.60) == CONTINUE  # NPO+GD forgets fast: high at rung 2
        assert s.decide("npo2", "NPO+GD", 2, 0.70) == CONTINUE
        return s

    plain = scheduler(False)
    assert plain.decide("me1", "ME+GD", 2, 0.55) == STOP  # the failure: ME+GD's best cut at rung 1
    guarded = scheduler(True)
    assert guarded.decide("me1", "ME+GD", 2, 0.55) == CONTINUE  # ME+GD's best at this rung so far
    assert guarded.decide("me2", "ME+GD", 2, 0.50) == STOP  # not ME+GD's best: ASHA's rule
    # below the rung's median (0.575) and NPO+GD's leader (0.70) is another trial
    assert guarded.decide("npo3", "NPO+GD", 2, 0.52) == STOP
    assert guarded.decide("npo1", "NPO+GD", 4, 0.61) == CONTINUE  # first at rung 4
    assert guarded.decide("me1", "ME+GD", 4, 0.56) == STOP  # later rungs: no floor
    assert guarded.stopped == {"me2": (2, "rung 2"), "npo3": (2, "rung 2"), "me1": (4, "rung 4")}


def test_revisit_withdraws_a_first_arrivals_free_pass_once_the_rung_fills():
    def run(revisit: bool) -> list[str]:
        s = RungScheduler(metric="objective", max_t=5, grace_period=1, reduction_factor=2,
                          keep_best_per_method=False, revisit=revisit)
        return [s.decide("a", "GA+GD", 1, 0.30),  # first at rung 1: passes on nothing
                s.decide("b", "GA+GD", 1, 0.60),
                s.decide("c", "GA+GD", 1, 0.50),  # below the median of (0.3, 0.6)? no: 0.5 >= 0.45
                s.decide("a", "GA+GD", 2, 0.31)]  # a's rung-1 value is now below the median of b, c

    assert run(False) == [CONTINUE, CONTINUE, CONTINUE, CONTINUE]
    assert run(True) == [CONTINUE, CONTINUE, CONTINUE, STOP]


def test_revisit_keeps_the_per_method_floor():
    s = RungScheduler(metric="objective", max_t=5, grace_period=1, reduction_factor=2,
                      keep_best_per_method=True, revisit=True)
    assert s.decide("me", "ME+GD", 1, 0.30) == CONTINUE
    assert s.decide("npo", "NPO+GD", 1, 0.60) == CONTINUE
    assert s.decide("me", "ME+GD", 2, 0.35) == CONTINUE  # below NPO+GD at rung 1, but ME+GD's best there


def test_rungs_are_rays():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in [(1, 2, 5), (2, 2, 5), (2, 3, 5), (1, 3, 10), (3, 2, 3)]:
        bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
        assert rung_epochs(grace, rf, max_t) == sorted(int(m) for m, _ in bracket._rungs)


# ----------------------------------------------------------------------------- dedupe


class Scripted:
    """A searcher that proposes the given configs in order and records what it is told."""

    metric, mode = "objective", "max"

    def __init__(self, configs):
        self.configs, self.asked, self.told = list(configs), [], []

    def suggest(self, trial_id):
        self.asked.append(trial_id)
        return self.configs.pop(0)

    def on_trial_result(self, trial_id, result):
        pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result, error))


def test_dedupe_tells_the_searcher_the_known_result_and_asks_again():
    a = {"method": "ME+GD", "lr": 1.0e-3, "epochs": 5, "ME+GD": {"lr": 1.0e-3}}
    a_again = {"method": "ME+GD", "lr": 1.0e-3 * (1 + 1e-9), "epochs": 5}  # the same to 6 digits
    b = {"method": "ME+GD", "lr": 2.0e-3, "epochs": 5}
    c = {"method": "NPO+GD", "lr": 1.0e-3, "epochs": 5}
    inner = Scripted([a, a_again, b, b, c])
    s = DedupeSearcher(inner)
    assert s.suggest("t1") == a
    s.on_trial_result("t1", {"objective": 0.5, "training_iteration": 2})
    s.on_trial_complete("t1", {"objective": 0.55, "training_iteration": 3})
    assert s.suggest("t2") == b  # a_again answered with t1's result, then b
    assert inner.told == [("t1", {"objective": 0.55, "training_iteration": 3}, False),
                          ("t2", {"objective": 0.55, "training_iteration": 3}, False)]
    assert s.suggest("t3") == c  # b repeats t2, still running: told as failed, asked again
    assert inner.told[-1] == ("t3", None, True)
    assert inner.asked == ["t1", "t2", "t2-repeat1", "t3", "t3-repeat1"] and s.repeats == 2
    s.on_trial_complete("t3", {"objective": 0.6})  # Tune's id reaches the searcher's own trial
    assert inner.told[-1] == ("t3-repeat1", {"objective": 0.6}, False)
    assert config_key(a) == config_key(a_again) != config_key(b)


def test_dedupe_on_optuna_never_repeats_a_point_of_a_small_space(capsys):
    """Two methods x two learning rates: 4 configs. Without dedupe TPE repeats some of them in 4
    proposals (for some seed); with it, the 4 proposals are the 4 configs, for every seed."""
    def proposals(dedupe: bool, seed: int) -> list[tuple]:
        cfg = SweepConfig.model_validate({"search": {
            "methods": ["GA+GD", "NPO+GD"], "space": {"lr": {"choice": [1e-4, 1e-3]}, "epochs": 2, "beta": 0.1},
            "num_samples": 4, "seed": seed, "enqueue_defaults": False, "dedupe": dedupe}})
        searcher = build_searcher(cfg, SpaceBuilder(cfg))
        searcher.set_search_properties("objective", "max", {})
        out = []
        for i in range(4):
            config = searcher.suggest(f"t{i}")
            out.append(config_key(config))
            searcher.on_trial_complete(f"t{i}", {"objective": config["lr"] * 100})
        return out

    assert any(len(set(proposals(False, seed))) < 4 for seed in range(5))
    for seed in range(5):
        assert len(set(proposals(True, seed))) == 4, seed
