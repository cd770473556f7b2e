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
        ours = RungScheduler(metric="objective", time_attr="training_iteration", max_t=max_t, grace_period=grace, reduction_factor=rf,
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
        s = RungScheduler(metric="objective", time_attr="training_iteration", max_t=5, grace_period=2, reduction_factor=2,
                          keep_best_per_method=keep, revisit=False)
        assert s.rungs == [2, 4]
        assert s.decide("npo1", "NPO+GD", 2, 0.60) == CONTINUE  # NPO+GD forgets fast: high at rung 2
        assert s.decide("npo2", "NPO+GD", 2, 0.70) == CONTINUE
        return s

    plain = scheduler(False)
    assert plain.decide("me1", "ME+GD", 2, 0.55) == STOP  # the issue's failure: ME+GD's best cut at rung 1
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
        s = RungScheduler(metric="objective", time_attr="training_iteration", max_t=5, grace_period=1, reduction_factor=2,
                          keep_best_per_method=False, revisit=revisit)
        return [s.decide("a", "GA+GD", 1, 0.30),  # first at rung 1: passes on nothing
                s.decide("b", "GA+GD", 1, 0.60),
                s.decide("c", "GA+GD", 1, 0.50),  # below the median of (0.3, 0.6)? no: 0.5 >= 0.45
                s.decide("a", "GA+GD", 2, 0.31)]  # a's rung-1 value is now below the median of b, c

    assert run(False) == [CONTINUE, CONTINUE, CONTINUE, CONTINUE]
    assert run(True) == [CONTINUE, CONTINUE, CONTINUE, STOP]


def test_revisit_keeps_the_per_method_floor():
    s = RungScheduler(metric="objective", time_attr="training_iteration", max_t=5, grace_period=1, reduction_factor=2,
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


# ----------------------------------------------------------------------------- shared parameters


def _two_methods(shared, seed: int = 0, n: int = 12, **space) -> SweepConfig:
    return SweepConfig.model_validate({"search": {
        "methods": ["ME+GD", "NPO+GD"], "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "epochs": 3, "beta": 0.1, **space},
        "overrides": {"ME+GD": {"forget_coeff": {"uniform": [0.05, 0.5]}}},
        "num_samples": n, "seed": seed, "enqueue_defaults": False, "shared_params": shared}})


def test_shared_params_resolve_to_the_keys_with_one_range_and_name_them_plainly():
    import optuna

    cfg = _two_methods("auto", forget_coeff={"uniform": [0.1, 1.0]}, epochs={"int": [2, 5]})
    assert cfg.search.shared_keys() == {"lr", "epochs"}  # forget_coeff: ME+GD's own range; beta fixed
    assert _two_methods("none").search.shared_keys() == set()
    assert _two_methods(["lr"]).search.shared_keys() == {"lr"}
    builder = SpaceBuilder(cfg)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        config = builder(trial)
        assert set(trial.params) == {"method", "lr", "epochs", f"{config['method']}/forget_coeff"}
        assert config["lr"] == trial.params["lr"] and config["epochs"] == trial.params["epochs"]
        study.tell(trial, 0.5)
    points = {p["method"]: p for p in builder.default_points()}
    assert points["NPO+GD"]["lr"] == points["ME+GD"]["lr"] == 1e-4  # training lr 1e-5 clipped, plain name
    assert "ME+GD/lr" not in points["ME+GD"] and "ME+GD/forget_coeff" in points["ME+GD"]
    unshared = {p["method"]: p for p in SpaceBuilder(_two_methods("none")).default_points()}
    assert "ME+GD/lr" in unshared["ME+GD"] and "lr" not in unshared["ME+GD"]


def test_a_shared_param_with_two_ranges_or_an_unknown_key_exits_2_naming_the_key(tmp_path, capsys):
    import yaml

    from raysweep.config import load_or_exit

    for shared, message in ((["lr", "forget_coeff"], "search.shared_params.1: forget_coeff is searched over "
                             "different ranges by ME+GD and NPO+GD: a shared parameter needs one range"),
                            (["alpha"], "search.shared_params.0: 'alpha' is not a search parameter")):
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump({"search": {
            "methods": ["ME+GD", "NPO+GD"], "space": {"forget_coeff": {"uniform": [0.1, 1.0]}},
            "overrides": {"ME+GD": {"forget_coeff": {"uniform": [0.05, 0.5]}}}, "shared_params": shared}}))
        with pytest.raises(SystemExit) as info:
            load_or_exit(path)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: {message}"), err


def test_a_shared_lr_lets_tpe_learn_from_every_methods_trials():
    """The objective peaks at lr = 1e-3 for both methods. After the start-up trials, a per-method
    TPE has one or two observations of each method's lr and proposes no better than random (mean
    |log10 lr + 3| = 0.5 for uniform draws); one shared lr is fitted to all trials and proposes
    nearer the peak, in every seed."""
    import math

    def distance_after_startup(shared: str, seed: int) -> float:
        cfg = _two_methods(shared, seed=seed)
        searcher = build_searcher(cfg, SpaceBuilder(cfg))
        searcher.set_search_properties("objective", "max", {})
        out = []
        for i in range(cfg.search.num_samples):
            config = searcher.suggest(f"t{i}")
            distance = abs(math.log10(config["lr"]) + 3)
            if i >= cfg.search.startup_trials():
                out.append(distance)
            searcher.on_trial_complete(f"t{i}", {"objective": 1 - distance})
        return sum(out) / len(out)

    per_method = [distance_after_startup("none", seed) for seed in range(5)]
    shared = [distance_after_startup("auto", seed) for seed in range(5)]
    assert all(s < p for s, p in zip(shared, per_method)), (shared, per_method)
    assert sum(shared) / 5 < 0.45 < sum(per_method) / 5, (shared, per_method)


# ----------------------------------------------------------------------------- export


def test_export_trial_writes_what_the_trial_ran_and_refuses_an_unknown_id(tmp_path, capsys):
    import json
    import shutil

    from raysweep.config import load_config
    from raysweep.report import main as report_main
    from raysweep.sweep.space import trial_experiment

    exp = tmp_path / "exp"
    trial_dir = exp / "run_trial_abc"
    trial_dir.mkdir(parents=True)
    cfg = SweepConfig.model_validate({"experiment": {"training": {"seed": 7}},
                                      "search": {"methods": ["ME+GD", "NPO+GD"], "resources": {"cpus_per_worker": 2}}})
    (exp / "sweep.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    params = {"method": "NPO+GD", "lr": 3e-4, "epochs": 2, "forget_coeff": 0.5, "reg_coeff": 1.0, "beta": 0.2}
    ran = trial_experiment(cfg.experiment, params, str(trial_dir / "outputs"))
    (trial_dir / "experiment.json").write_text(ran.model_dump_json())
    summary = {"trial_id": "abc", "trial_name": "run_trial_abc", "path": str(trial_dir), "status": "TERMINATED",
               "params": params, "best": {"objective": 0.6, "MU": 0.5, "FE": 0.7}, "best_epoch": 2,
               "early_stopped": False}
    (exp / "trials.json").write_text(json.dumps([summary]))

    expected = ran.model_copy(deep=True)
    expected.training.output_dir = None
    assert report_main([str(exp), "--export-trial", "abc"]) == 0
    assert capsys.readouterr().out.strip() == f"{exp}/abc.yaml"
    exported = load_config(exp / "abc.yaml")
    assert exported.experiment == expected and exported.experiment.training.seed == 7
    assert exported.search.methods == ["NPO+GD"] and exported.search.resources.cpus_per_worker == 2
    assert (exp / "abc.yaml").read_text().startswith("# raysweep trial abc (run_trial_abc)")

    shutil.rmtree(trial_dir)  # no experiment.json: rebuilt from sweep.json the way the trial was
    assert report_main([str(exp), "--export-trial", "run_trial_abc", "--out", str(tmp_path / "t.yaml")]) == 0
    assert load_config(tmp_path / "t.yaml").experiment == expected
    capsys.readouterr()

    assert report_main([str(exp), "--export-trial", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {exp}: no trial 'nope' (trials: abc)"]
    assert report_main([str(tmp_path / "missing"), "--export-trial", "abc"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- through Tune


GUARDED = {
    "experiment": {"name": "guards", "training": {"lr": 1e-5, "epochs": 4, "warmup_epochs": 1.0}},
    "search": {
        "methods": ["GA+GD", "NPO+GD"],
        # 2 methods x 2 learning rates: 4 configs, which 4 de-duplicated proposals must cover
        "space": {"lr": {"choice": [1e-5, 1e-4]}, "epochs": 4, "beta": 0.1},
        "overrides": {"GA+GD": {"forget_coeff": 0.05}, "NPO+GD": {"forget_coeff": 1.0}},
        "num_samples": 4,
        "max_concurrent": 1,  # results in start order: the scheduler's decisions can be replayed
        "seed": 0,  # a seed whose order exercises the per-method floor (checked below)
        "enqueue_defaults": False,
        "dedupe": True,
        "shared_params": "auto",  # lr: one Optuna parameter for both methods
        "scheduler": {"type": "asha", "grace_period": "auto", "reduction_factor": 2, "metric": "best_so_far",
                      "keep_best_per_method": True, "revisit": True},
    },
}


def replay(trials: list[dict], keep_best_per_method: bool) -> dict[str, int]:
    """The epoch each trial must end at: RungScheduler's policy on the fake worker's known curves
    (best so far), trials one after another in start order."""
    import fake_worker

    s = RungScheduler(metric="objective_best", time_attr="training_iteration", max_t=4, grace_period=2, reduction_factor=2,
                      keep_best_per_method=keep_best_per_method, revisit=True)
    ends = {}
    for t in trials:
        p, best = t["params"], float("-inf")
        for epoch in range(1, 5):
            best = max(best, fake_worker.objective(p["lr"], p["forget_coeff"], epoch))
            if epoch == 4 or s.decide(t["trial_id"], p["method"], epoch, best) == STOP:
                ends[t["trial_id"]] = epoch
                break
    return ends


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_search_guards_through_tune(tmp_path):
    import json
    from pathlib import Path

    import fake_worker
    from test_tune import fake_env, run_cli, tail, write_yaml

    from raysweep.config import load_config
    from raysweep.report import main as report_main
    from raysweep.tracking import TAG_PARENT, client_for

    space = write_yaml(tmp_path / "space.yaml", GUARDED)
    log = tmp_path / "driver.log"
    proc = run_cli(["--space", str(space), "--storage", str(tmp_path / "results"), "--name", "guards",
                    "--set", "tracking.log_generations=false"], fake_env(tmp_path, RAYSWEEP_FAKE_SLEEP="0.2"), log)
    assert proc.returncode == 0, tail(log)
    path = tmp_path / "results" / "guards"
    trials = json.loads((path / "trials.json").read_text())  # in start order

    # dedupe: four proposals, four different configs (the whole space)
    assert len({(t["params"]["method"], t["params"]["lr"]) for t in trials}) == 4
    # metric best_so_far: every epoch carries objective_best, the running max of objective
    for t in trials:
        objectives = [row["objective"] for row in t["history"]]
        assert [row["objective_best"] for row in t["history"]] == [max(objectives[:i + 1]) for i in range(len(objectives))]
    # grace auto (after the 1-epoch warm-up) + per-method floor + revisit: the trials ended where the
    # policy says, and without the floor at least one would have ended elsewhere
    ends = {t["trial_id"]: t["last"]["epoch"] for t in trials}
    assert ends == replay(trials, keep_best_per_method=True), [(t["params"], t["last"]["epoch"]) for t in trials]
    assert ends != replay(trials, keep_best_per_method=False)
    assert min(ends.values()) == 2  # the first rung is epoch 2, not epoch 1

    # every option in the MLflow parent run
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    parent = next(r for r in runs if TAG_PARENT not in r.data.tags).data.params
    assert {k: parent[k] for k in ("search.scheduler.grace_period", "search.scheduler.grace_epochs",
                                   "search.scheduler.metric", "search.scheduler.keep_best_per_method",
                                   "search.scheduler.revisit", "search.dedupe", "search.shared_params")} == {
        "search.scheduler.grace_period": "auto", "search.scheduler.grace_epochs": "2",
        "search.scheduler.metric": "best_so_far", "search.scheduler.keep_best_per_method": "True",
        "search.scheduler.revisit": "True", "search.dedupe": "True", "search.shared_params": "auto"}
    # shared_params: the searcher Tune saved modelled one "lr" over both methods' trials
    import pickle

    import optuna
    from test_resume_old_layout import instances_in

    studies = instances_in(pickle.loads(next(path.glob("searcher-state-*.pkl")).read_bytes()), optuna.Study)
    assert studies, "no Optuna study in the saved searcher state"
    told = studies[0].get_trials(deepcopy=False)
    assert {frozenset(t.params) for t in told} == {frozenset({"method", "lr"})}
    assert {t.params["method"] for t in told} == {"GA+GD", "NPO+GD"}

    # best.yaml: the best trial as an experiment file, which reproduces its reported epochs
    best = json.loads((path / "best.json").read_text())
    rerun = load_config(path / "best.yaml")
    trial = next(t for t in trials if t["trial_id"] == best["trial_id"])
    ran = json.loads((Path(trial["path"]) / "experiment.json").read_text())
    ran["training"]["output_dir"] = None
    assert rerun.experiment.model_dump(mode="json") == ran and rerun.search.methods == [best["params"]["method"]]
    reports = []
    fake_worker.run(rerun.experiment, reports.append)
    for row in trial["history"]:
        assert reports[row["epoch"] - 1].metrics["objective"] == pytest.approx(row["objective"], abs=1e-12)
    # --export-trial: any trial; an unknown id is one line and exit 2
    other = trials[-1]
    assert report_main([str(path), "--export-trial", other["trial_id"]]) == 0
    exported = load_config(path / f"{other['trial_id']}.yaml")
    assert exported.experiment.training.lr == other["params"]["lr"]
    assert exported.experiment.training.method == other["params"]["method"]
