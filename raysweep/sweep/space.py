"""The search: Optuna's define-by-run space (:class:`SpaceBuilder`), the searcher, ASHA, Tune's
``param_space`` for grids, the progress table's columns and the trial directory names.

The method facts (which methods use β, their paper defaults) come from the method spec in
:mod:`raysweep.losses`, so a new loss needs no change here.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Any

from raysweep.config import ExperimentConfig, Range, SweepConfig, fail
from raysweep.losses import parse_method
from raysweep.sweep.results import GRID_KEY, INT_KEYS, PARAM_KEYS

# Columns of the progress table: config key / metric -> header.
PARAMETER_COLUMNS = {"method": "method", "lr": "lr", "epochs": "epochs", "forget_coeff": "α", "beta": "β"}
METRIC_COLUMNS = {"epoch": "epoch", "MU": "MU", "FE": "FE", "objective": "objective"}


def uses_beta(method: str) -> bool:
    """β matters only for NPO/DPO forget losses and the AP regularizer (``Method.uses_beta``)."""
    return parse_method(method).uses_beta


def _suggest(trial: Any, name: str, key: str, value: Range) -> Any:
    kind = value.kind
    if kind == "loguniform":
        low, high = value.loguniform
        out = trial.suggest_float(name, float(low), float(high), log=True)
    elif kind == "uniform":
        low, high = value.uniform
        out = trial.suggest_float(name, float(low), float(high))
    elif kind == "int":
        low, high = value.int
        out = trial.suggest_int(name, int(low), int(high))
    else:
        out = trial.suggest_categorical(name, list(value.choice))
    if key in INT_KEYS:
        out = int(round(out))
    return out


def _snap(value: Range, target: float) -> Any:
    """``target`` moved into the range: clipped, rounded for ints, nearest for a choice list."""
    kind = value.kind
    if kind == "choice":
        options = list(value.choice)
        if target in options:
            return target
        numeric = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
        if not numeric:
            return options[0]
        if target > 0 and all(o > 0 for o in numeric):
            return min(numeric, key=lambda o: abs(math.log(o) - math.log(target)))
        return min(numeric, key=lambda o: abs(o - target))
    low, high = value.bounds()
    clipped = min(max(target, low), high)
    return int(round(clipped)) if kind == "int" else float(clipped)


class SpaceBuilder:
    """Optuna define-by-run space: ``method`` first, then that method's own parameters.

    Optuna's parameter names are namespaced per method (``"ME+GD/lr"``) so that TPE models each
    method's space separately, except the ``search.shared_params`` (``"lr"``: one distribution that
    TPE fits to every method's trials); the returned dict also holds them flat (``lr``, ``epochs``, ...),
    which is what the trial and the progress table read. β is sampled only for methods that use
    it (NPO, DPO, AP): a GA trial's config has no ``beta``. A parameter given as a scalar is fixed;
    one not given at all takes ``experiment.training``'s value (shown in the table, not searched).

    Module-level and picklable: Tune saves it with the searcher state for ``--resume``.
    """

    def __init__(self, sweep: SweepConfig):
        search, training = sweep.search, sweep.experiment.training
        self.methods = list(search.methods)
        self.shared = frozenset(search.shared_keys())
        self.spaces = {m: search.space_for(m) for m in self.methods}
        self.training_values = {
            "lr": training.lr,
            "epochs": training.epochs,
            "forget_coeff": training.forget_coeff,
            "reg_coeff": training.reg_coeff,
            "beta": training.beta,
        }
        # lr and epochs: the paper's values are the YAML's ``experiment.training`` ones.
        self.paper_targets = {
            "lr": training.lr,
            "epochs": training.epochs,
            "lora_r": training.lora.r if training.lora.enabled else 0,
        }

    def param_name(self, method: str, key: str) -> str:
        """Optuna's name for ``key`` in ``method``'s space: ``"ME+GD/lr"``, or plain ``"lr"`` for a
        parameter in ``search.shared_params`` (one distribution, modelled over all methods' trials)."""
        # getattr: a SpaceBuilder pickled before shared_params (a resumed sweep) has no .shared
        return key if key in getattr(self, "shared", ()) else f"{method}/{key}"

    def keys_for(self, method: str) -> list[str]:
        return [k for k in PARAM_KEYS if k != "beta" or uses_beta(method)]

    def __call__(self, trial: Any) -> dict[str, Any]:
        method = trial.suggest_categorical("method", self.methods)
        space = self.spaces[method]
        out: dict[str, Any] = {"method": method}
        for key in self.keys_for(method):
            value = getattr(space, key)
            if isinstance(value, Range):
                out[key] = _suggest(trial, self.param_name(method, key), key, value)
            elif (fixed := self._fixed(key, value)) is not None:
                out[key] = fixed
        return out

    def _fixed(self, key: str, value: Any) -> Any:
        """A key that is not searched: its scalar from the space, else ``experiment.training``'s
        value (None when neither gives one)."""
        if value is not None:
            return int(value) if key in INT_KEYS else value
        return self.training_values.get(key)

    def default_points(self) -> list[dict[str, Any]]:
        """The paper's defaults of each method, as Optuna parameters (for ``enqueue_trial``)."""
        points = []
        for method in self.methods:
            targets = {**self.paper_targets, **parse_method(method).paper_defaults}
            point: dict[str, Any] = {"method": method}
            for key in self.keys_for(method):
                value = getattr(self.spaces[method], key)
                if isinstance(value, Range):
                    point[self.param_name(method, key)] = _snap(value, targets[key])
            points.append(point)
        return points

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of each method's choice lists, as trial configs (``algorithm: grid``).

        Scalars are fixed, unset keys take ``experiment.training``'s value, as in :meth:`__call__`;
        the config validation guarantees no continuous range is left.
        """
        points = []
        for method in self.methods:
            keys, options = [], []
            for key in self.keys_for(method):
                value = getattr(self.spaces[method], key)
                if isinstance(value, Range):
                    values = [int(v) if key in INT_KEYS else v for v in value.choice]
                elif (fixed := self._fixed(key, value)) is not None:
                    values = [fixed]
                else:
                    continue
                keys.append(key)
                options.append(values)
            for combo in itertools.product(*options):
                points.append({"method": method, **dict(zip(keys, combo))})
        return points

    def max_epochs(self) -> int:
        best = 1
        for space in self.spaces.values():
            value = space.epochs
            if isinstance(value, Range):
                best = max(best, int(value.bounds()[1]))
            elif value is not None:
                best = max(best, int(value))
            else:
                best = max(best, int(self.training_values["epochs"]))
        return best


def build_searcher(sweep: SweepConfig, space: SpaceBuilder):
    """``OptunaSearch`` (TPE seeded with ``search.seed``) wrapped in a ``ConcurrencyLimiter``;
    for ``algorithm: grid``, Tune's ``BasicVariantGenerator`` over :meth:`SpaceBuilder.grid_points`."""
    search = sweep.search
    if search.algorithm == "grid":  # the points themselves are the param_space (param_space())
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=search.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group: TPE models each method's (conditional) parameters jointly;
        # constant_liar: concurrent trials do not all pick the same point. With shared_params,
        # the method and the shared parameters form one group, modelled over every trial.
        sampler = optuna.samplers.TPESampler(
            seed=search.seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=search.startup_trials(),
        )
    if search.objective == "pareto":
        metric, mode = ["MU", "FE"], ["max", "max"]
    else:
        metric, mode = "objective", "max"
    searcher = OptunaSearch(
        space=space,
        metric=metric,
        mode=mode,
        sampler=sampler,
        points_to_evaluate=space.default_points() if search.enqueue_defaults else None,
    )
    if search.dedupe:
        searcher = DedupeSearcher(searcher)
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)


def config_key(config: dict[str, Any]) -> tuple:
    """What makes two trial configs the same: the flat values (not Optuna's per-method copies),
    floats to 6 significant digits (a log-uniform lr printed as 1.07e-3 is one config)."""
    return tuple(sorted((k, float(f"{v:.6g}") if isinstance(v, float) else v)
                        for k, v in config.items() if not isinstance(v, dict)))


def _searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class DedupeSearcher(_searcher_base()):
    """``search.dedupe``: a searcher that never hands Tune a configuration it already ran.

    A proposal equal (:func:`config_key`) to an earlier trial's is answered inside: the wrapped
    searcher is told the earlier trial's last result for it (or that it failed, while the earlier
    trial still runs), and is asked again, up to ``tries`` times; after that the repeat runs, with
    a warning. ``repeats`` counts the proposals answered this way.
    """

    def __init__(self, searcher: Any, tries: int = 20):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.tries = searcher, tries
        self.seen: dict[tuple, str] = {}  # config key -> the trial that ran it
        self.last: dict[str, dict] = {}  # trial id -> its last result
        self.inner: dict[str, str] = {}  # Tune's trial id -> the wrapped searcher's (after re-asks)
        self.repeats = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # the ConcurrencyLimiter around this limits

    def suggest(self, trial_id: str) -> dict | None:
        inner_id = trial_id
        config = self.searcher.suggest(inner_id)
        for attempt in range(1, self.tries + 1):
            earlier = self._earlier(config)
            if earlier is None:
                break
            self.repeats += 1
            self.searcher.on_trial_complete(inner_id, result=self.last.get(earlier), error=earlier not in self.last)
            inner_id = f"{trial_id}-repeat{attempt}"  # a fresh id: the wrapped searcher's trial
            config = self.searcher.suggest(inner_id)
        if self._earlier(config) is not None:
            print(f"warning: search.dedupe: {self.tries} proposals in a row repeated earlier trials; "
                  "running the repeat", flush=True)
        self.inner[trial_id] = inner_id
        if isinstance(config, dict):
            self.seen.setdefault(config_key(config), trial_id)
        return config

    def _earlier(self, config: Any) -> str | None:
        return self.seen.get(config_key(config)) if isinstance(config, dict) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.last[trial_id] = result
        self.searcher.on_trial_result(self.inner.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None:
            self.last[trial_id] = result
        self.searcher.on_trial_complete(self.inner.get(trial_id, trial_id), result=result, error=error)

    # Tune saves a wrapper's own state (get_state) and the innermost searcher's (save) apart.
    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


def num_samples(sweep: SweepConfig) -> int:
    """Trials to run: ``search.num_samples``; a grid runs each of its points once."""
    return 1 if sweep.search.algorithm == "grid" else sweep.search.num_samples


def param_space(sweep: SweepConfig, space: SpaceBuilder) -> dict[str, Any] | None:
    """Tune's ``param_space``: none for Optuna (define-by-run); a grid search over whole trial
    configs for ``algorithm: grid`` (each method has its own keys, so no per-key grid)."""
    if sweep.search.algorithm != "grid":
        return None
    from ray import tune

    return {GRID_KEY: tune.grid_search(space.grid_points())}


def max_t(sweep: SweepConfig, space: SpaceBuilder) -> int:
    return sweep.search.scheduler.max_t or space.max_epochs()


def trial_rung_epochs(sweep: SweepConfig) -> list[int]:
    """The epochs at which ASHA decides about a trial (none without a scheduler), for
    ``experiment.eval.rung_epochs``: the first epoch at or after each rung's milestone, and
    ``max_t``. The grace period is the resolved one (``auto``: after the warm-up)."""
    sched = sweep.search.scheduler
    if sched.type == "none":
        return []
    from raysweep.eval.schedule import rung_epochs
    from raysweep.sweep.schedule import grace_epochs

    top = max_t(sweep, SpaceBuilder(sweep))
    return rung_epochs(grace_epochs(sweep, top), sched.reduction_factor, top)


def build_scheduler(sweep: SweepConfig, space: SpaceBuilder):
    """ASHA on ``objective`` (or ``objective_best``) per reported epoch, also in Pareto mode (it
    needs one number), with the guards of :mod:`raysweep.sweep.schedule`; or no scheduler."""
    from raysweep.sweep.schedule import build_scheduler as build

    return build(sweep, max_t(sweep, space))


def check_scheduler(sweep: SweepConfig, space_file: str) -> None:
    """ASHA's first rung must fit in the epochs a trial can run (exit 2 naming the key)."""
    from raysweep.sweep.schedule import check_grace

    check_grace(sweep, sweep.search.scheduler.max_t or SpaceBuilder(sweep).max_epochs(), space_file)


def build_reporter(sweep: SweepConfig, space: SpaceBuilder):
    """Tune's progress table with our columns (needs ``RAY_AIR_NEW_OUTPUT=0``, set in main)."""
    from ray import tune

    params = dict(PARAMETER_COLUMNS)
    for key, header in (("reg_coeff", "γ"), ("lora_r", "lora_r")):
        if any(isinstance(getattr(s, key), Range) for s in space.spaces.values()):
            params[key] = header
    if sweep.search.algorithm == "grid":  # the values live under the grid point's key
        params = {f"{GRID_KEY}/{key}": header for key, header in params.items()}
    return tune.CLIReporter(parameter_columns=params, metric_columns=dict(METRIC_COLUMNS), max_report_frequency=10)


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (``run_trial_<id>``) instead of Tune's parameter strings."""
    return f"{trial.trainable_name}_{trial.trial_id}"




def trial_experiment(base: Any, params: dict[str, Any], output_dir: str | None = None):
    """The trial's ``ExperimentConfig``: ``base`` with the sampled training values laid on top.

    ``lora_r`` maps to ``training.lora`` (0 = full fine-tuning, > 0 = LoRA of that rank); the
    result is re-validated, so a bad combination fails here with pydantic's message.
    """
    data = base.model_dump(mode="json") if hasattr(base, "model_dump") else dict(base)
    training = dict(data.get("training") or {})
    for key, value in params.items():
        if key == "lora_r":
            lora = dict(training.get("lora") or {})
            r = int(value)
            lora["enabled"] = r > 0
            if r > 0:
                lora["r"] = r
            training["lora"] = lora
        elif key == "epochs":
            training["epochs"] = int(value)
        else:
            training[key] = value
    if output_dir is not None:
        training["output_dir"] = str(output_dir)
    data["training"] = training
    return ExperimentConfig.model_validate(data)

