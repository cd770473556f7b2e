"""Scenarios: which model, which training sets and which evaluation sets one run uses.

``resolve(cfg)`` turns the experiment section into concrete paths (building the embedded
default on first use); ``load_run_data(cfg, resolved)`` reads the records.  The three scenarios
of the paper differ only here:

- ``fictitious``: TOFU-style forget split (``task_ids`` of ``forgetXX``) against ``retainYY``;
  evaluated on forget, retain, real authors and world facts.
- ``continual``: the same files, one forget subtask per step (see :func:`continual_steps`).
- ``real_world``: real people in the seed layout (``forget``, ``neighbor``, ``*_perturbed``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from raysweep.config import EMBEDDED, EMBEDDED_RETAIN, ExperimentConfig
from raysweep.smollm2 import SMOLLM2, SMOLLM2_RETAIN
from raysweep.data.loaders import DataError, load_hub_split, load_local_split, load_qa_file
from raysweep.data.records import QARecord
from raysweep.data.templates import load_idk_templates, load_seed_idk_lines

# The seed code's evaluation sizes: ``ds_size: 300`` of every TOFU set (config/tofu.yaml:44,
# applied as ``select(range(min(ds_size, len)))`` in eval.py:126-132), every real-world question
# (config/real_world.yaml:43, ``ds_size: null``).
SEED_TOFU_EVAL_SIZE = 300
SEED_IDK_FILE = "data/idontknow.jsonl"  # path of the rejection templates in the seed repository

# How a set is scored (paper Appendix D): TOFU's fictitious QA, TOFU's general-knowledge sets
# (short answer + options, sentence-long ``original_answer``) or real-world people.
Style = Literal["tofu", "general", "real_world"]


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set. ``is_forget`` sets go into FE, the others into MU."""

    name: str
    records: list[QARecord]
    is_forget: bool
    style: Style


@dataclass(frozen=True)
class Resolved:
    """Concrete locations for one experiment."""

    model: str  # hub id or directory
    retain_model: str | None
    data_dir: Path | None  # seed-layout directory (local or embedded); None for the hub
    embedded_stats: dict = field(default_factory=dict)


@dataclass
class RunData:
    forget: list[QARecord]
    retain: list[QARecord]
    idk_templates: list[str]
    eval_sets: dict[str, EvalSet]


def _uses_embedded(cfg: ExperimentConfig) -> bool:
    names = (cfg.model.name_or_path, cfg.model.retain_model)
    return cfg.data.source == "synthetic" or EMBEDDED in names or EMBEDDED_RETAIN in names


def ensure_embedded_for(cfg: ExperimentConfig) -> None:
    """Build the embedded default now if ``cfg`` uses it (a no-op when cached or not used)."""
    if _uses_embedded(cfg):
        from raysweep.prepare import ensure_embedded

        ensure_embedded(cfg.data.synthetic, cfg.model.embedded)


def resolve(cfg: ExperimentConfig) -> Resolved:
    """Paths of model, retain model and data; builds the embedded default when it is asked for."""
    artifacts = None
    if _uses_embedded(cfg):
        from raysweep.prepare import ensure_embedded

        artifacts = ensure_embedded(cfg.data.synthetic, cfg.model.embedded)

    def model_path(name: str | None) -> str | None:
        if name == EMBEDDED:
            return str(artifacts.target_dir)
        if name == EMBEDDED_RETAIN:
            return str(artifacts.retain_dir)
        if name in (SMOLLM2, SMOLLM2_RETAIN):  # the prepared real-model default (raysweep.smollm2)
            from raysweep.smollm2 import model_dir

            return model_dir(name)
        return name

    retain = cfg.model.retain_model
    if retain is None and cfg.model.name_or_path == EMBEDDED:
        retain = EMBEDDED_RETAIN  # the embedded default always has its retain model
    data_dir = Path(artifacts.data_dir) if cfg.data.source == "synthetic" else file_data_dir(cfg)
    return Resolved(
        model=model_path(cfg.model.name_or_path),
        retain_model=model_path(retain),
        data_dir=data_dir,
        embedded_stats=dict(artifacts.stats) if artifacts is not None else {},
    )


def file_data_dir(cfg: ExperimentConfig) -> Path | None:
    """The directory of a ``local`` or ``seed`` source (``seed``: fetched and sha256-checked on
    first use, :mod:`raysweep.data.fetch`, which raises ``FetchError``); None for synthetic and hub."""
    if cfg.data.source == "local":
        return Path(cfg.data.path).expanduser()
    if cfg.data.source == "seed":
        from raysweep.data.fetch import SCENARIO_BUNDLE, seed_dir

        return seed_dir(SCENARIO_BUNDLE[cfg.scenario])
    return None


def _split_loader(resolved: Resolved):
    if resolved.data_dir is None:
        return lambda split, task_ids=None: load_hub_split(split, task_ids=task_ids)
    return lambda split, task_ids=None: load_local_split(resolved.data_dir, split, task_ids=task_ids)


def _first_people(records: list[QARecord], n: int | None) -> list[QARecord]:
    if n is None:
        return records
    keep: list[str] = []
    for r in records:
        if r.name not in keep:
            keep.append(r.name)
    keep_set = set(keep[:n])
    return [r for r in records if r.name in keep_set]


def _cap(records: list[QARecord], n: int | None) -> list[QARecord]:
    return records if n is None else records[:n]


def continual_tasks(cfg: ExperimentConfig, resolved: Resolved) -> list[int]:
    """The forget subtasks of a continual run, in the order they are unlearned."""
    present = sorted({r.task_id for r in _split_loader(resolved)(cfg.data.forget_split) if r.task_id is not None})
    if not present:
        raise ValueError(f"{cfg.data.forget_split} has no task_id: it cannot be unlearned continually")
    tasks = [t for t in present if cfg.data.task_ids is None or t in cfg.data.task_ids]
    return tasks[: cfg.continual.steps] if cfg.continual.steps else tasks


def load_step_data(cfg: ExperimentConfig, resolved: Resolved, tasks: list[int], step: int) -> RunData:
    """Step ``step`` (0-based) of a continual run: forget task ``tasks[step]``.

    The retain set is the base retain split (without any forget question) plus every forget
    record whose task is not yet unlearned, ``tasks[:step + 1]`` excluded, as in the seed code
    (``forget.py:44-47``: retain = retainXX + every task not yet unlearned): tasks that are never
    scheduled (``continual.steps`` < all tasks, or left out of ``data.task_ids``) stay in it.  It
    shrinks step by step; ``continual.retain_min_size`` tops it up from the supplement
    (:func:`load_supplement`: general QA that is in no evaluation set, paper Fig. 7b) when it gets
    smaller than that.
    """
    load = _split_loader(resolved)
    base = load_run_data(cfg, resolved, task_ids=[tasks[step]])
    all_forget = load(cfg.data.forget_split)
    every_forget_question = {r.question for r in all_forget}
    unlearned = set(tasks[: step + 1])
    retain = [r for r in load(cfg.data.retain_split) if r.question not in every_forget_question]
    retain += [r for r in all_forget if r.task_id not in unlearned]
    minimum = cfg.continual.retain_min_size
    if minimum is not None and len(retain) < minimum:
        extra = load_supplement(cfg, resolved)
        retain += [extra[i % len(extra)] for i in range(minimum - len(retain))]
    base.retain = retain
    return base


class SupplementError(DataError):
    """The continual supplement is missing, empty, or shares questions with evaluation data."""


def _supplement_key(cfg: ExperimentConfig) -> str:
    if cfg.continual.supplement_path is not None:
        return "experiment.continual.supplement_path"
    return "experiment.continual.supplement_split"


def load_supplement(cfg: ExperimentConfig, resolved: Resolved, load=None) -> list[QARecord]:
    """The general QA that tops up a continual retain set, checked against evaluation data.

    ``continual.supplement_path`` (a local file, :func:`raysweep.data.loaders.load_qa_file`),
    else ``continual.supplement_split`` (a split of the data source), else, on the synthetic
    source, the embedded default's own general-QA set (``synthetic.general_supplement``).
    Raises :class:`SupplementError` (key ``experiment.continual.supplement_*``) when none is
    given on another source, when it is empty, or when any of its questions is in an evaluation
    set (or in the forget split): the model would be trained on what it is then scored on.
    """
    load = load or _split_loader(resolved)
    c, key = cfg.continual, _supplement_key(cfg)
    if c.supplement_path is not None:
        where = str(c.supplement_path)
        records = load_qa_file(c.supplement_path)
    elif c.supplement_split is not None:
        where = _split_name(resolved, c.supplement_split)
        records = [QARecord(question=r.question, answer=r.original_answer or r.answer)
                   for r in load(c.supplement_split)]
    elif cfg.data.source == "synthetic":
        from raysweep.data.synthetic import general_supplement

        where = "embedded general-QA supplement"
        records = general_supplement(cfg.data.synthetic)
    else:
        raise SupplementError(
            "experiment.continual", key,
            "continual.retain_min_size needs general QA that is in no evaluation set: set "
            "supplement_path (a local JSON/JSONL file, e.g. Alpaca) or supplement_split",
        )
    if not records:
        raise SupplementError(where, key, "the supplement holds no record")
    check_supplement(records, _evaluated_questions(cfg, load), where, key)
    return records


def _split_name(resolved: Resolved, split: str) -> str:
    return str(resolved.data_dir / f"{split}.json") if resolved.data_dir is not None else f"hub:{split}"


def _evaluated_questions(cfg: ExperimentConfig, load) -> dict[str, set[str]]:
    """Questions of every set a continual run evaluates on (all steps), and of the forget split."""
    names = [f"{cfg.data.forget_split}_perturbed", "retain_perturbed", "real_authors_perturbed",
             "world_facts_perturbed", cfg.data.forget_split]
    evaluated = {name: {r.question for r in load(name)} for name in names}
    try:  # the membership-inference attacks score forget against holdout, where there is one
        evaluated["holdout"] = {r.question for r in load("holdout")}
    except Exception:  # noqa: BLE001 - optional: a missing split (file or hub config) is no holdout
        pass
    return evaluated


def check_supplement(records: list[QARecord], evaluated: dict[str, set[str]], where: str, key: str) -> None:
    """Raise :class:`SupplementError` naming every evaluated set any supplement question is in."""
    questions = {r.question for r in records}
    hits = {name: questions & asked for name, asked in evaluated.items() if questions & asked}
    if hits:
        shared = set().union(*hits.values())
        raise SupplementError(
            where, key,
            f"{len(shared)} supplement question(s) are in the evaluation set(s) "
            f"{', '.join(repr(n) for n in hits)} (e.g. {sorted(shared)[0]!r}); the retain top-up "
            "must be data the run is not scored on",
        )


def eval_caps(cfg: ExperimentConfig) -> tuple[int | None, int | None]:
    """How many records of (the forget set, every other set) are evaluated: the first ones.

    ``raysweep``: ``eval.max_forget_samples`` / ``eval.max_samples``.  ``seed``: the seed code's
    ``ds_size`` — 300 of every TOFU set, all of the real-world sets — whatever ``eval`` says.
    """
    if cfg.protocol != "seed":
        return cfg.eval.max_forget_samples, cfg.eval.max_samples
    if cfg.scenario == "real_world":
        return None, None
    return SEED_TOFU_EVAL_SIZE, SEED_TOFU_EVAL_SIZE


def idk_templates_for(cfg: ExperimentConfig) -> list[str]:
    """Rejection templates of a run.

    ``raysweep``: ``data.idk_path`` or the project's own ``UNLEARN_TEMPLATES``.  ``seed``: the
    seed code's ``data/idontknow.jsonl`` lines as it reads them (``dataset/data_module.py:96-98``
    and ``:126``), from ``data.idk_path`` when set, else downloaded at the pinned commit and
    checked (``raysweep.data.fetch.seed_file``; offline: exit 2 naming the file).
    """
    if cfg.protocol != "seed" or cfg.data.idk_path is None and cfg.data.source == "synthetic":
        # the embedded default keeps its own templates under both protocols: its target model
        # learned PRIOR_TEMPLATES as its rejection prior, disjoint from these (templates.py)
        return load_idk_templates(cfg.data.idk_path)
    path = cfg.data.idk_path
    if path is None:
        from raysweep.data.fetch import fetch_file  # lazy: only the seed protocol downloads

        path = fetch_file(SEED_IDK_FILE)
    return load_seed_idk_lines(path)


def load_run_data(cfg: ExperimentConfig, resolved: Resolved, task_ids: list[int] | None = None) -> RunData:
    """Training and evaluation records of one run (``task_ids`` overrides ``data.task_ids``)."""
    load = _split_loader(resolved)
    data = cfg.data
    task_ids = task_ids if task_ids is not None else data.task_ids
    idk = idk_templates_for(cfg)
    forget_cap, other_cap = eval_caps(cfg)

    if cfg.scenario == "real_world":
        forget = _first_people(load(data.forget_split, task_ids), data.select.forget_people)
        retain = _first_people(load(data.retain_split), data.select.neighbor_people)
        forget_names = {r.name for r in forget}
        forget_eval = [r for r in load(f"{data.forget_split}_perturbed") if r.name in forget_names]
        neighbor_eval = _first_people(load(f"{data.retain_split}_perturbed"), data.select.neighbor_people)
        eval_sets = {
            "forget": EvalSet("forget", _cap(forget_eval, forget_cap), True, "real_world"),
            "neighbor": EvalSet("neighbor", _cap(neighbor_eval, other_cap), False, "real_world"),
        }
        return RunData(forget, retain, idk, eval_sets)

    forget = load(data.forget_split, task_ids)
    retain = load(data.retain_split)
    forget_eval = load(f"{data.forget_split}_perturbed", task_ids)
    eval_sets = {
        "forget": EvalSet("forget", _cap(forget_eval, forget_cap), True, "tofu"),
        "retain": EvalSet("retain", _cap(load("retain_perturbed"), other_cap), False, "tofu"),
        "real_authors": EvalSet(
            "real_authors", _cap(load("real_authors_perturbed"), other_cap), False, "general"
        ),
        "world_facts": EvalSet(
            "world_facts", _cap(load("world_facts_perturbed"), other_cap), False, "general"
        ),
    }
    return RunData(forget, retain, idk, eval_sets)


def check_run_data(cfg: ExperimentConfig, resolved: Resolved, data: RunData) -> None:
    """Content checks of a run's data, done before any model or Ray work.

    Raises ``DataError`` naming the split: an empty forget set, forget and retain sharing
    questions (the model would be told to forget and to keep the same answer), or perturbed
    answer lists of inconsistent length within an evaluation set.
    """
    where = resolved.data_dir if resolved.data_dir is not None else Path("hub")
    split = lambda name: where / f"{name}.json"  # noqa: E731
    if not data.forget:
        raise DataError(split(cfg.data.forget_split), "task_id", "the forget set is empty")
    shared = {r.question for r in data.forget} & {r.question for r in data.retain}
    if shared:
        example = sorted(shared)[0]
        raise DataError(
            split(cfg.data.retain_split), "question",
            f"{len(shared)} question(s) are in both the forget and the retain set, e.g. {example!r}",
        )
    for eval_set in data.eval_sets.values():
        lengths = {len(r.perturbed_answer) for r in eval_set.records}
        if 0 in lengths or len(lengths) > 1:
            raise DataError(
                f"evaluation set {eval_set.name!r}", "perturbed_answer",
                f"every record needs the same number (>= 1) of perturbed answers, found {sorted(lengths)}",
            )


def preflight_data(cfg: ExperimentConfig) -> None:
    """Read and check local data files before anything heavy starts (exit 2 on bad content).

    Only ``source: local`` and ``seed`` are read here (``seed`` fetched first, into the cache;
    offline or a checksum mismatch exits 2 naming the file, URL and fetch command): synthetic
    data is generated correct by construction and hub data would need a download.  Two checks
    run on every source: under ``protocol: seed`` the seed's rejection templates are fetched now
    (cached; offline: exit 2 naming the file), and a continual run's retain supplement is checked
    against the evaluation sets (synthetic data: generated in memory, ~1 s).
    """
    from raysweep.config import fail
    from raysweep.data.fetch import FetchError

    try:  # the seed's files (templates, data) are fetched now: offline, exit 2 naming them
        if cfg.protocol == "seed":
            try:
                idk_templates_for(cfg)
            except DataError as err:
                fail(err.path, "experiment.data.idk_path", err.message)
        data_dir = file_data_dir(cfg)
    except FetchError as err:
        print(err.one_line(), file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.scenario == "continual" and cfg.continual.retain_min_size is not None and cfg.data.source != "hub":
        if cfg.data.source == "synthetic":
            from raysweep.data.synthetic import generate

            splits = generate(cfg.data.synthetic).splits

            def load(split, task_ids=None):
                if split not in splits:
                    raise DataError(f"synthetic:{split}", None, f"split '{split}' not found")
                return [r for r in splits[split] if task_ids is None or r.task_id in task_ids]

            resolved = Resolved(model=cfg.model.name_or_path, retain_model=None, data_dir=Path("synthetic"))
        else:
            resolved = Resolved(model=cfg.model.name_or_path, retain_model=None, data_dir=data_dir)
            load = None
        try:
            load_supplement(cfg, resolved, load)
        except DataError as err:
            where = err.path if err.line is None else f"{err.path}:{err.line}"
            key = err.key if isinstance(err, SupplementError) else _supplement_key(cfg)
            fail(where, key or "", err.message)
    if data_dir is None:
        return
    resolved = Resolved(model=cfg.model.name_or_path, retain_model=None, data_dir=data_dir)
    try:
        if cfg.scenario == "continual":
            tasks = continual_tasks(cfg, resolved)
            data = load_step_data(cfg, resolved, tasks, 0)
        else:
            data = load_run_data(cfg, resolved)
        check_run_data(cfg, resolved, data)
    except DataError as err:
        where = err.path if err.line is None else f"{err.path}:{err.line}"
        fail(where, err.key or "", err.message)
