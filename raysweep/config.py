"""The YAML schema of ``search_spaces/*.yaml``: pydantic models, loading, ``--set`` overrides.

A sweep file has three sections::

    experiment:   # what one unlearning run is: scenario, model, data, eval, training defaults
    search:       # what Ray Tune varies: methods, per-method spaces, objective, scheduler, resources
    tracking:     # where MLflow writes

Everything is validated here, before Ray or a model is touched: a bad file gives one
``ConfigError`` naming the file and the dotted key, which the command-line entry points turn
into one line on stderr and exit code 2 (:func:`load_or_exit`).
"""

from __future__ import annotations

import builtins
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysweep.data.synthetic import SyntheticSpec
from raysweep.eval.downstream import DownstreamConfig
from raysweep.models import TinyModelSpec

EMBEDDED = "embedded"
EMBEDDED_RETAIN = "embedded-retain"
SCENARIOS = ("fictitious", "continual", "real_world")
SEARCHABLE = ("lr", "epochs", "forget_coeff", "reg_coeff", "beta", "lora_r")


class ConfigError(Exception):
    """A bad configuration: ``file`` and dotted ``key`` say where, ``message`` says what."""

    def __init__(self, file: str | Path | None, key: str, message: str):
        self.file = str(file) if file is not None else "<config>"
        self.key = key
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return " ".join(f"error: {where}: {self.message}".splitlines())  # \n, \r, \x0b, ...


class Strict(BaseModel):
    """Base of every section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- experiment


class ModelConfig(Strict):
    name_or_path: str = EMBEDDED  # "embedded", a Hugging Face hub id, or a local directory
    retain_model: str | None = None  # model trained without the forget set, for Forget Quality
    retain_eval_log: Path | None = None  # or a TOFU-format eval_log_forget.json of that model
    prompt_template: Literal["plain", "llama2", "llama3", "chat_template"] = "plain"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    embedded: TinyModelSpec = Field(default_factory=TinyModelSpec)

    @field_validator("name_or_path", "retain_model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is None or value in (EMBEDDED, EMBEDDED_RETAIN):
            return value
        looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).exists()
        if looks_local and not Path(value).expanduser().is_dir():
            raise ValueError(f"model directory {value!r} does not exist")
        return value

    @field_validator("retain_eval_log")
    @classmethod
    def _log_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value


class SelectConfig(Strict):
    """Real-world scenario: how many people to forget and to keep as neighbours (None = all)."""

    forget_people: int | None = Field(default=None, ge=1)
    neighbor_people: int | None = Field(default=None, ge=1)


class DataConfig(Strict):
    # seed: the paper's files (real_world / tofu by scenario), fetched from the seed repository at
    # a pinned commit and checked by sha256 on first use (raysweep.data.fetch)
    source: Literal["synthetic", "local", "hub", "seed"] = "synthetic"
    path: Path | None = None  # the seed JSONL layout directory, for source: local
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    task_ids: list[int] | None = Field(default_factory=lambda: [1])  # forget subtasks; None = all
    idk_path: Path | None = None  # TOFU idontknow.jsonl; None = the project's own templates
    max_length: int = Field(default=500, ge=8)
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    select: SelectConfig = Field(default_factory=SelectConfig)

    @field_validator("idk_path")
    @classmethod
    def _idk_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _local_files_exist(self) -> "DataConfig":
        if self.source == "seed":
            if self.path is not None:
                raise _KeyedError("path", "not used with source 'seed' (the files are fetched into $RAYSWEEP_CACHE)")
            return self
        if self.source != "local":
            return self
        if self.path is None:
            raise _KeyedError("path", "required when source is 'local'")
        if not self.path.expanduser().is_dir():
            raise _KeyedError("path", f"data directory {str(self.path)!r} does not exist")
        for split in (self.forget_split, self.retain_split):
            file = self.path.expanduser() / f"{split}.json"
            if not file.is_file():
                key = "forget_split" if split == self.forget_split else "retain_split"
                raise _KeyedError(key, f"data file {str(file)!r} does not exist")
        return self


class EvalConfig(Strict):
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=200, ge=8)  # prompt + generation, in tokens
    max_forget_samples: int | None = Field(default=300, ge=1)
    max_samples: int | None = Field(default=None, ge=1)  # cap per non-forget set
    embedding_model: str | None = "sentence-transformers/paraphrase-MiniLM-L6-v2"
    nli_model: str | None = "sileod/deberta-v3-base-tasksource-nli"
    nli_batch_size: int = Field(default=32, ge=1)
    forget_quality: bool = False
    privacy: bool = True
    downstream: DownstreamConfig | None = None  # lm-eval tasks at the end of a trial
    objective_includes_downstream: bool = False  # objective = mean(MU, FE, downstream scores)
    # epoch: evaluate (and report) after every epoch; rungs: only at the ASHA rung epochs of the
    # sweep (grace x rf^n, and max_t) and at the trial's last epoch (raysweep.eval.schedule)
    every: Literal["epoch", "rungs"] = "epoch"
    # Set by the sweep from search.scheduler (TrialSetup.from_sweep), not by hand: the epochs at
    # which ASHA compares trials. Empty = no scheduler (rungs then means the last epoch only).
    rung_epochs: list[int] = Field(default_factory=list)
    # ZeRO-3: evaluate on weights gathered once per evaluation (hooks off, no synced_gpus) when
    # measured free memory holds them (auto), always, or never (every layer gathered per call)
    gather: Literal["auto", "always", "never"] = "auto"


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class DeepSpeedConfig(Strict):
    """DeepSpeed ZeRO settings of a run. ``auto`` is decided at trial start from the model's
    size, the GPU's measured free memory, the world size and the method (``raysweep.memory_plan``):
    ZeRO-2 without offload when it fits, ZeRO-3 when not, CPU offload only as the last resort.
    On CPU (no GPU memory to measure) ``auto`` is ZeRO-3 without offload or checkpointing."""

    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    offload_optimizer: Literal["auto", "cpu", "none"] = "auto"
    offload_param: Literal["cpu", "none"] = "none"
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"


class TrainingConfig(Strict):
    """One unlearning run's fixed values; the search section varies some of them per trial."""

    method: str = "ME+GD"
    lr: float = Field(default=1e-5, gt=0)
    epochs: int = Field(default=5, ge=1)
    forget_coeff: float = Field(default=1.0, ge=0)  # alpha
    reg_coeff: float = Field(default=1.0, ge=0)  # gamma
    beta: float = Field(default=0.1, gt=0)
    effective_batch_size: int = Field(default=32, ge=1)  # per-device batch x accumulation x world
    # auto: the largest micro-batch the memory plan fits (accumulation makes up the effective batch)
    per_device_batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = 4
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    seed: int = 1001
    me_divergence: Literal["paper", "code"] = "code"
    me_mask_question: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig | None = None
    # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (not its fused cross-entropy: the
    # losses need the logits); needs the [gpu] extra (liger-kernel) and GPUs
    liger: bool = False
    save_checkpoint: Literal["none", "final", "best"] = "none"
    output_dir: Path | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _check_method(value)

    @field_validator("liger")
    @classmethod
    def _liger_installed(cls, value: bool) -> bool:
        if value and not liger_available():
            raise ValueError("true needs the liger-kernel package: pip install -e '.[gpu]' (or set false)")
        return value


class ContinualConfig(Strict):
    """Continual unlearning: the forget subtasks are unlearned one after another."""

    reference: Literal["previous", "initial"] = "previous"  # what NPO/DPO/KL compare with
    objective: Literal["mean", "final"] = "mean"  # over steps of (MU + FE) / 2
    steps: int | None = Field(default=None, ge=1)  # first N subtasks; None = all
    retain_min_size: int | None = Field(default=None, ge=1)  # top the retain set up to this size
    # What tops it up: general QA that is in no evaluation set (paper Fig. 7b uses Alpaca).
    # supplement_split: a split of the data source (seed layout dir or hub); supplement_path: a
    # local JSON / JSON Lines file of {question, answer} or Alpaca {instruction, input, output}
    # records.  Neither (default): the embedded default's own general-QA set (synthetic source);
    # other sources must name one.  Any supplement question found in an evaluation set: exit 2.
    supplement_split: str | None = None
    supplement_path: Path | None = None

    @field_validator("supplement_path")
    @classmethod
    def _supplement_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _one_supplement(self) -> "ContinualConfig":
        if self.supplement_split is not None and self.supplement_path is not None:
            raise _KeyedError("supplement_path", "give supplement_split or supplement_path, not both")
        return self


PROTOCOLS = ("raysweep", "seed")


class ExperimentConfig(Strict):
    name: str = "raysweep"
    # seed: step counts, ME/KL reductions, padding, rejection-template pairing and evaluation
    # set sizes exactly as the paper's code (sail-sg/closer-look-LLM-unlearning@b622294);
    # raysweep: this project's choices (docs/FIDELITY.md says where and why they differ)
    protocol: Literal["raysweep", "seed"] = "raysweep"
    scenario: Literal["fictitious", "continual", "real_world"] = "fictitious"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    @model_validator(mode="after")
    def _seed_protocol(self) -> "ExperimentConfig":
        if self.protocol == "seed" and self.training.me_divergence != "code":
            raise _KeyedError("training.me_divergence",
                              "protocol seed uses the seed code's ME divergence KL(U||P): set 'code'")
        return self

    @model_validator(mode="after")
    def _seed_splits_exist(self) -> "ExperimentConfig":
        if self.data.source != "seed":
            return self
        from raysweep.data.fetch import SCENARIO_BUNDLE, seed_splits

        bundle = SCENARIO_BUNDLE[self.scenario]
        for key in ("forget_split", "retain_split"):
            split = getattr(self.data, key)
            if split not in seed_splits(bundle):
                raise _KeyedError(f"data.{key}", f"{split!r} is not in the seed's data/{bundle} "
                                                 f"(there: {', '.join(seed_splits(bundle))})")
        return self


# ----------------------------------------------------------------------------- search


class Range(Strict):
    """A searched parameter: exactly one of ``loguniform``, ``uniform``, ``int``, ``choice``."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None  # noqa: A003 (the YAML key)
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Range":
        given = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice list is empty")
            return self
        low, high = getattr(self, kind)
        if not low < high:
            raise _KeyedError(kind, f"low ({low}) must be < high ({high})")
        if kind == "loguniform" and low <= 0:
            raise _KeyedError(kind, f"loguniform bounds must be > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None)

    def bounds(self) -> tuple[Any, Any]:
        values = getattr(self, self.kind)
        return (min(values), max(values)) if self.kind == "choice" else tuple(values)


Param = Union[Range, float, int, bool]


class ParamSpace(Strict):
    """Per-parameter search space; a scalar fixes the value, a Range searches it."""

    lr: Param | None = None
    epochs: Param | None = None
    forget_coeff: Param | None = None
    reg_coeff: Param | None = None
    beta: Param | None = None
    lora_r: Param | None = None  # 0 = full fine-tuning, > 0 = LoRA of that rank

    @model_validator(mode="after")
    def _positive(self) -> "ParamSpace":
        minimum = {"lr": (0.0, False), "beta": (0.0, False), "epochs": (1, True), "lora_r": (0, True)}
        for name, (bound, inclusive) in minimum.items():
            value = getattr(self, name)
            if value is None:
                continue
            low = value.bounds()[0] if isinstance(value, Range) else value
            ok = low >= bound if inclusive else low > bound
            if not ok:
                sign = ">=" if inclusive else ">"
                raise _KeyedError(name, f"must be {sign} {bound}, got {low}")
        return self


class SchedulerConfig(Strict):
    """ASHA on the reported epochs (docs/BENCHMARKS.md, "Why good configurations die early")."""

    type: Literal["asha", "none"] = "asha"
    # epochs before the first rung; auto: ceil(experiment.training.warmup_epochs) + 1, so that no
    # trial is judged inside its lr warm-up (raysweep.sweep.schedule.grace_epochs)
    grace_period: Union[Literal["auto"], int] = "auto"
    reduction_factor: float = Field(default=2.0, gt=1)
    max_t: int | None = Field(default=None, ge=1)  # default: the largest epochs in the space
    # what a rung compares: the objective of the rung's epoch, or the trial's best so far
    metric: Literal["last", "best_so_far"] = "last"
    # never stop, at its first rung, a trial that is the best of its method there so far
    keep_best_per_method: bool = True
    # re-judge a running trial at the rungs it passed as they fill (a first arrival's free pass
    # is withdrawn once the rung has enough values to place it below the cut-off)
    revisit: bool = False

    @field_validator("grace_period", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, builtins.int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be 'auto' or an integer >= 1, got {value!r}")


class ResourcesConfig(Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0)


class SearchConfig(Strict):
    methods: list[str] = Field(default_factory=lambda: ["ME+GD"], min_length=1)
    space: ParamSpace = Field(default_factory=ParamSpace)
    overrides: dict[str, ParamSpace] = Field(default_factory=dict)  # per-method spaces
    objective: Literal["mean", "pareto"] = "mean"
    # optuna: TPE over the ranges; grid: every combination of each method's choice lists (the
    # paper's protocol), once each — num_samples is then the number of grid points
    algorithm: Literal["optuna", "grid"] = "optuna"
    seed: int = 0
    # TPE's random start-up trials before it models the space; None: num_samples // 4, clipped
    # to [2, 10] (Optuna's own default of 10 leaves a 12-trial sweep almost random)
    tpe_startup_trials: int | None = Field(default=None, ge=1)
    enqueue_defaults: bool = True  # the paper's defaults of each method are tried first
    # a proposal equal to an earlier trial's configuration (floats compared to 6 significant
    # digits) is not run: Optuna is told the earlier result and asked again
    dedupe: bool = True
    # which parameters TPE models across methods rather than per method: "none" (each method's
    # lr, epochs, ... are its own Optuna parameters, "ME+GD/lr"), "auto" (every parameter that all
    # methods searching it search over the same range), or a list of keys. A 12-trial sweep over
    # 4 methods gives a per-method TPE ~3 observations of each lr; a shared lr gets all 12.
    shared_params: Literal["none", "auto"] | list[str] = "none"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=0)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage_path: Path | None = None  # local dir, NFS path or s3://…; default ./ray_results

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            try:
                _check_method(name)
            except ValueError as err:
                raise _KeyedError(str(i), str(err)) from None
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides_name_methods(cls, value: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        # A method may have overrides without being listed (e.g. --set search.methods=[…]
        # narrows a sweep), but its name must be a method.
        for name in value:
            try:
                _check_method(name)
            except ValueError as err:
                raise _KeyedError(name, str(err)) from None
        return value

    @model_validator(mode="after")
    def _grid_needs_lists(self) -> "SearchConfig":
        if self.algorithm != "grid":
            return self
        for method in self.methods:
            space = self.space_for(method)
            for key in ParamSpace.model_fields:
                value = getattr(space, key)
                if isinstance(value, Range) and value.kind != "choice":
                    where = f"overrides.{method}.{key}" if key in self._override_keys(method) else f"space.{key}"
                    raise _KeyedError(where, f"algorithm grid needs a choice list or a fixed value, not {value.kind}")
        return self

    @model_validator(mode="after")
    def _shared_params_agree(self) -> "SearchConfig":
        if not isinstance(self.shared_params, list):
            return self
        for i, key in enumerate(self.shared_params):
            if key not in ParamSpace.model_fields:
                raise _KeyedError(f"shared_params.{i}", f"{key!r} is not a search parameter "
                                  f"(one of {', '.join(ParamSpace.model_fields)})")
            if (pair := self._range_conflict(key)) is not None:
                raise _KeyedError(f"shared_params.{i}", f"{key} is searched over different ranges by "
                                  f"{pair[0]} and {pair[1]}: a shared parameter needs one range")
        return self

    def _searched_ranges(self, key: str) -> dict[str, Range]:
        """``{method: its Range for key}`` over the methods that search ``key``."""
        ranges = {m: getattr(self.space_for(m), key) for m in self.methods}
        return {m: r for m, r in ranges.items() if isinstance(r, Range)}

    def _range_conflict(self, key: str) -> tuple[str, str] | None:
        """The first two methods that search ``key`` over different ranges, or None."""
        ranges = list(self._searched_ranges(key).items())
        return next(((ranges[0][0], m) for m, r in ranges[1:] if r != ranges[0][1]), None)

    def shared_keys(self) -> set[str]:
        """The parameters TPE models across methods (``shared_params`` resolved): the keys asked
        for that some method searches and every method searching searches over one range."""
        if self.shared_params == "none":
            return set()
        keys = ParamSpace.model_fields if self.shared_params == "auto" else self.shared_params
        return {k for k in keys if self._searched_ranges(k) and self._range_conflict(k) is None}

    def _override_keys(self, method: str) -> set[str]:
        spec = self.overrides.get(method)
        return set() if spec is None else set(spec.model_dump(exclude_none=True))

    def startup_trials(self) -> int:
        if self.tpe_startup_trials is not None:
            return self.tpe_startup_trials
        return min(10, max(2, self.num_samples // 4))

    def space_for(self, method: str) -> ParamSpace:
        """The method's space: ``space`` with the method's ``overrides`` laid on top."""
        merged = self.space.model_dump(exclude_none=True)
        if method in self.overrides:
            merged.update(self.overrides[method].model_dump(exclude_none=True))
        return ParamSpace.model_validate(merged)


class TrackingConfig(Strict):
    enabled: bool = True  # false: no MLflow at all (results stay in the experiment directory)
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "raysweep"
    redact_forget: bool = False
    log_generations: bool = True

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = value.split("://", 1)[0] if "://" in value else "file"
        if scheme not in ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql"):
            raise ValueError(f"unknown MLflow tracking URI scheme {scheme!r}")
        return value


class SweepConfig(Strict):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _liger_needs_gpus(self) -> "SweepConfig":
        if self.experiment.training.liger and not self.search.resources.use_gpu:
            raise _KeyedError("experiment.training.liger",
                              "true needs GPUs (Liger's kernels are Triton/CUDA): set search.resources.use_gpu: true")
        return self


# ----------------------------------------------------------------------------- loading


class _KeyedError(ValueError):
    """A validator's error about a sub-key (pydantic's location stops at the validated model)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def liger_available() -> bool:
    """Whether the ``liger-kernel`` package (the ``[gpu]`` extra) can be imported."""
    import importlib.util

    if "liger_kernel" in sys.modules:
        return sys.modules["liger_kernel"] is not None
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def _check_method(name: str) -> str:
    from raysweep.losses import parse_method  # torch import: only when a method is named

    parse_method(name)
    return name


def apply_overrides(raw: dict[str, Any], overrides: list[str], file: str | Path | None = None) -> dict:
    """Apply ``a.b.c=value`` strings to a raw config dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(file, item, "--set expects KEY=VALUE")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(file, key.strip(), "--set has an empty key part")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(file, ".".join(parts[: depth + 1]), "is not a section, cannot --set below it")
            node = child
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
            value = text  # not a YAML scalar (e.g. "2001-13-45"): the plain string
        node[parts[-1]] = _check_structure(value, file, key.strip())
    return raw


# A YAML alias repeats a node by reference: a recursive one makes a cycle, nested ones can
# expand exponentially ("billion laughs"). Past this many nodes a config is not a config.
MAX_NODES = 100_000


def _check_structure(value: Any, file: str | Path | None, where: str = "") -> Any:
    """Reject cycles (recursive aliases) and alias bombs in a parsed YAML value, naming the key."""
    count = 0
    stack: list[tuple[Any, str, frozenset[int]]] = [(value, where, frozenset())]
    while stack:
        node, key, ancestors = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(file, where, f"expands to more than {MAX_NODES} values (nested YAML aliases?)")
        if isinstance(node, dict):
            children = [(f"{key}.{k}" if key else str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(f"{key}[{i}]", v) for i, v in enumerate(node)]
        else:
            continue
        if id(node) in ancestors:
            raise ConfigError(file, key, "refers to itself (a recursive YAML alias)")
        inner = ancestors | {id(node)}
        stack.extend((child, child_key, inner) for child_key, child in children)
    return value


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML document of ``path``; :class:`ConfigError` for anything that is not a
    readable, UTF-8, well-formed, non-empty, finite YAML mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(path, "", "is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(path, "", "file does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(path, "", f"cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path, "", f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, where, f"not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a timestamp like 2001-13-45
        raise ConfigError(path, "", f"not valid YAML ({err})") from None
    except RecursionError:
        raise ConfigError(path, "", "not valid YAML (nested too deeply)") from None
    if raw is None:
        raise ConfigError(path, "", "file is empty (a sweep file needs at least an experiment or search section)")
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "top level must be a mapping of experiment/search/tracking")
    return _check_structure(raw, path)


def _error_from_validation(file: str | Path | None, err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    # Drop pydantic's own location steps: validator names ("function-after[…]") and union
    # member names ("Range", "float", …) are not keys of the YAML file.
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    loc = [p for p in loc if p not in ("Range", "float", "int", "bool")]
    message = first["msg"]
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyedError):
        loc.append(ctx_err.key)
        message = str(ctx_err)
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return ConfigError(file, ".".join(loc), message)


def parse_config(raw: Any, file: str | Path | None = None) -> SweepConfig:
    """Validate an already-parsed YAML document."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "top level must be a mapping of experiment/search/tracking")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise _error_from_validation(file, err) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read, override and validate a sweep YAML; raise :class:`ConfigError` on any problem."""
    raw = read_yaml(path)
    apply_overrides(raw, overrides or [], path)
    return parse_config(raw, path)


def load_or_exit(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """:func:`load_config` for command-line entry points: one line on stderr and exit 2 on error."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(err.one_line(), file=sys.stderr)
        raise SystemExit(2) from None


def fail(file: str | Path | None, key: str, message: str) -> NoReturn:
    """Report a bad input found after schema validation (e.g. a data file's content) and exit 2."""
    print(ConfigError(file, key, message).one_line(), file=sys.stderr)
    raise SystemExit(2)

