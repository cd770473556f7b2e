"""Downstream task scores of an (unlearned) model through EleutherAI's lm-evaluation-harness.

The real-world scenario of Yuan et al. (ICLR 2025) reports, besides forget / retain metrics,
how much general capability the unlearned model keeps on five standard benchmarks.  Each is an
lm-eval task; the number reported is one entry of lm-eval's per-task result row, whose keys
are ``"<metric>,<filter>"`` (``"none"`` when the task defines no filter pipeline):

============== ================================ ==============================================
task           reported key                     what it measures
============== ================================ ==============================================
arc_challenge  ``acc_norm,none``                ARC-Challenge: grade-school science multiple
                                                choice (4 options) that retrieval and
                                                co-occurrence baselines get wrong; accuracy of
                                                the option with the highest length-normalised
                                                log-likelihood.
mmlu           ``acc,none``                     MMLU: 57 subjects (STEM, humanities, social
                                                sciences, other), 4-option multiple choice on
                                                the answer letter; the ``mmlu`` group's
                                                accuracy, averaged over subtasks weighted by
                                                their size.
truthfulqa_mc1 ``acc,none``                     TruthfulQA MC1: questions that invite common
                                                misconceptions; accuracy of ranking the single
                                                true answer above all false ones (always
                                                0-shot with the task's fixed 6-QA prompt).
triviaqa       ``exact_match,remove_whitespace`` TriviaQA (rc.nocontext): closed-book factual
                                                recall; greedy answer up to the first
                                                newline / period / comma, whitespace stripped,
                                                exact match (case and punctuation ignored)
                                                against any answer alias.
gsm8k          ``exact_match,flexible-extract`` GSM8K: grade-school math word problems,
                                                5-shot by default; exact match of the last
                                                number in the greedy answer with the reference.
============== ================================ ==============================================

These keys were checked against the task YAMLs of lm-eval 0.4.13 (``arc/arc_easy.yaml`` +
``arc_challenge.yaml``: ``metric_list`` acc, acc_norm, no filters; ``mmlu/default/_mmlu.yaml``:
group with ``aggregate_metric_list: [acc]``; ``truthfulqa/truthfulqa_mc1.yaml``: acc;
``triviaqa/default.yaml``: filter ``remove_whitespace``; ``gsm8k/gsm8k.yaml``: filters
``strict-match`` and ``flexible-extract``).

For a task missing from both :attr:`DownstreamConfig.metrics` and :data:`DEFAULT_METRICS`, the
first numeric ``"<metric>,<filter>"`` entry of its result row that is not a stderr (in lm-eval's
order: per filter, the task's ``metric_list`` order; bookkeeping entries such as ``sample_len``
are skipped) is reported, and a log line says which key was taken.

The model is evaluated **in memory** (``HFLM(pretrained=<PreTrainedModel>)``), never re-loaded
from disk; a peft-wrapped model works the same.  Datasets come from wherever the task YAML says
(the Hugging Face hub for the five defaults); with no network access a task fails to load and
:func:`run_downstream` raises :class:`DownstreamError` naming it - it never returns a number for
a task that was not evaluated.  ``lm_eval`` is imported only when :func:`run_downstream` runs,
so importing this module (e.g. for :class:`DownstreamConfig`) is cheap.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import numbers
import os
import random
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("arc_challenge", "mmlu", "truthfulqa_mc1", "triviaqa", "gsm8k")

DEFAULT_METRICS: dict[str, str] = {
    "arc_challenge": "acc_norm,none",
    "mmlu": "acc,none",
    "truthfulqa_mc1": "acc,none",
    "triviaqa": "exact_match,remove_whitespace",
    "gsm8k": "exact_match,flexible-extract",
}

KEY_PREFIX = "downstream/"


class DownstreamError(RuntimeError):
    """A downstream task could not be evaluated (unknown name, dataset failed to load, …).

    ``task`` is the task name as given in :attr:`DownstreamConfig.tasks`."""

    def __init__(self, task: str, message: str):
        self.task = task
        super().__init__(f"downstream task {task!r}: {message}")


class DownstreamMetricError(KeyError):
    """The metric key to report is not in lm-eval's result row for a task (or not a number)."""

    def __init__(self, task: str, key: str | None, message: str):
        self.task, self.key = task, key
        self.message = f"downstream task {task!r}, metric {key!r}: {message}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class DownstreamConfig(BaseModel):
    """Which lm-eval tasks to run on the model and which number to report for each.

    - ``tasks``: lm-eval task, group or tag names (or paths of task YAML files).
    - ``limit``: examples per task (for a group such as ``mmlu``: per subtask); a float < 1 is a
      fraction of each task's evaluation split; None = all (the paper's setting).
    - ``batch_size``: HFLM batch size (loglikelihood and generation requests).
    - ``num_fewshot``: overrides every task's default few-shot count (lm-eval keeps tasks whose
      YAML fixes it to 0, e.g. truthfulqa_mc1, at 0); None = each task's own default (gsm8k: 5,
      others: 0).
    - ``include_path``: a directory of custom task YAMLs, indexed in addition to lm-eval's own.
    - ``include_defaults``: index lm-eval's ~15k built-in tasks as well (takes ~10 s once per
      process); set False when only ``include_path`` tasks are run.
    - ``metrics``: task -> result key (``"<metric>,<filter>"``) to report.  Tasks missing here
      fall back to :data:`DEFAULT_METRICS`, then to the first numeric non-stderr key.
    - ``apply_chat_template``: format prompts with the tokenizer's chat template (lm-eval's
      option of the same name); off in the paper's setting.
    """

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1)
    limit: int | float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    include_path: str | None = None
    include_defaults: bool = True
    metrics: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_METRICS))
    apply_chat_template: bool = False

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[str]) -> list[str]:
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ValueError(f"duplicate downstream tasks: {dup}")
        if any(not t.strip() for t in tasks):
            raise ValueError("empty downstream task name")
        return tasks

    @field_validator("limit")
    @classmethod
    def _check_limit(cls, limit: int | float | None) -> int | float | None:
        if isinstance(limit, float) and limit >= 1:
            if not limit.is_integer():
                raise ValueError(f"limit {limit}: a float limit must be a fraction < 1 or a whole count")
            return int(limit)
        return limit

    def metric_key(self, task: str) -> str | None:
        """The result key reported for ``task`` (None: first numeric non-stderr key)."""
        return self.metrics.get(task, DEFAULT_METRICS.get(task))


# ---------------------------------------------------------------------------------------------
# lm-eval plumbing


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool):
    """One TaskManager per (include_path, include_defaults) and process: indexing lm-eval's
    built-in task YAMLs takes ~10 s, so it is done once.  YAMLs added to ``include_path`` after
    the first call in a process are not seen."""
    from lm_eval.tasks import TaskManager

    kwargs: dict[str, Any] = {"include_path": include_path}
    if not include_defaults:
        kwargs["include_defaults"] = False
    return TaskManager(**kwargs)


def _load_task(tm, name: str):
    """Load one task / group / tag (datasets included); DownstreamError naming it on failure.

    Returns what to pass to ``simple_evaluate(tasks=[...])``: the loaded objects where the
    installed lm-eval's TaskManager has ``load`` (as 0.4.13 does), else the name (the task loads
    twice; the dataset comes from the datasets cache the second time)."""
    if name not in tm.all_tasks and not os.path.isfile(name):
        close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
        hint = f"; close matches: {close}" if close else ""
        raise DownstreamError(
            name,
            "unknown lm-eval task/group/tag name (not among lm-eval's tasks nor in include_path)"
            + hint,
        )
    try:
        if hasattr(tm, "load"):
            loaded = tm.load([name])
            if not loaded["tasks"]:
                raise ValueError("it expands to no task")
            return _top_level(loaded)
        from lm_eval.tasks import get_task_dict  # older lm-eval

        get_task_dict([name], tm)
        return [name]
    except DownstreamError:
        raise
    except Exception as e:  # dataset download (offline), bad YAML, missing files, …
        raise DownstreamError(name, f"failed to load ({type(e).__name__}: {e})") from e


def _top_level(loaded: Mapping[str, Any]) -> list:
    """The outermost Groups and the Tasks in no group of a ``TaskManager.load`` result (passing a
    group's subgroups or subtasks as well would evaluate them twice)."""
    groups, tasks = loaded["groups"], loaded["tasks"]
    children = {c for members in loaded.get("group_map", {}).values() for c in members}
    in_group: set[str] = set()
    for g in groups.values():
        in_group.update(t.task_name for t in g.get_all_tasks())
    return [g for n, g in groups.items() if n not in children] + [
        t for n, t in tasks.items() if n not in in_group and n not in children
    ]


def _pick(task: str, row: Mapping[str, Any] | None, key: str | None, available_rows) -> float:
    if row is None:
        raise DownstreamMetricError(
            task, key, f"no result row for the task in lm-eval's results (rows: {sorted(available_rows)})"
        )
    # metric entries are "<metric>,<filter>"; bookkeeping entries ("alias", "sample_len", …) have
    # no comma
    numeric = {
        k: v
        for k, v in row.items()
        if "," in k and "_stderr," not in k and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
    if key is None:
        if not numeric:
            raise DownstreamMetricError(task, None, f"no numeric metric in the result row {dict(row)}")
        key = next(iter(numeric))
        log.info("downstream task %r: no metric configured; reporting the first one, %r", task, key)
    if key not in row:
        raise DownstreamMetricError(task, key, f"not in lm-eval's result row (keys: {sorted(row)})")
    value = row[key]
    if key not in numeric or not math.isfinite(float(value)):
        raise DownstreamMetricError(task, key, f"value {value!r} is not a metric value (a finite number)")
    return float(value)


class _RNGState:
    """Save / restore the global RNGs that ``simple_evaluate`` reseeds (python, numpy, torch)."""

    def __enter__(self):
        import numpy as np
        import torch

        self.py = random.getstate()
        self.np = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return self

    def __exit__(self, *exc):
        import numpy as np
        import torch

        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


def run_downstream(model, tokenizer, cfg: DownstreamConfig, device=None) -> dict[str, float]:
    """Evaluate the in-memory ``model`` on ``cfg.tasks`` with lm-eval; ``{"downstream/<task>": v}``.

    ``model`` is a ``transformers.PreTrainedModel`` (causal LM) or a peft model wrapping one;
    ``tokenizer`` its (fast or slow) HF tokenizer.  ``device``: None evaluates where the model
    is; otherwise the model is moved there for the evaluation and back afterwards.

    All tasks are loaded first, one by one, so a task that cannot be loaded (unknown name,
    dataset not reachable offline, bad YAML) raises :class:`DownstreamError` naming it before
    any model time is spent.  Then one ``lm_eval.simple_evaluate`` call runs them all
    (``bootstrap_iters=0``: no bootstrap stderrs; ``log_samples=False``).  A configured metric
    key absent from a task's result row raises :class:`DownstreamMetricError` (a ``KeyError``)
    naming task and key.

    Side effects are undone: every module's train/eval flag, the model's device, and the
    python / numpy / torch global RNG states (simple_evaluate reseeds them) are restored.  If
    the tokenizer has no pad token, lm-eval would set one on it, so a copy is passed instead.
    """
    with _RNGState():  # task loading and simple_evaluate both touch the global RNGs
        results = _evaluate(model, tokenizer, cfg, device)

    if results is None:  # only on a non-zero rank, which an in-memory HFLM never is
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    rows: dict[str, Mapping[str, Any]] = dict(results.get("results", {}))
    for name, row in results.get("groups", {}).items():
        rows.setdefault(name, row)
    out: dict[str, float] = {}
    for name in cfg.tasks:
        row = rows.get(name) if name in rows else _row_for_path(name, rows)
        out[KEY_PREFIX + name] = _pick(name, row, cfg.metric_key(name), rows.keys())
    return out


def _evaluate(model, tokenizer, cfg: DownstreamConfig, device) -> Mapping[str, Any] | None:
    """Load every task (DownstreamError naming the first that fails), then one simple_evaluate."""
    import copy

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm = _task_manager(cfg.include_path, cfg.include_defaults)
    specs: list = []
    for name in cfg.tasks:
        specs.extend(_load_task(tm, name))

    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)

    modes = [(m, m.training) for m in model.modules()]
    orig_device = _model_device(model)
    target = torch.device(device) if device is not None else orig_device
    moved = target != orig_device
    try:
        if moved:
            model.to(target)
        with torch.no_grad():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            results = simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=cfg.apply_chat_template,
                task_manager=tm,
            )
    finally:
        if moved:
            model.to(orig_device)
        for m, training in modes:
            m.training = training

    return results

def _row_for_path(name: str, rows: Mapping[str, Mapping[str, Any]]):
    """For a task given as a YAML path, its row is under the ``task:`` name inside the file."""
    if not os.path.isfile(name):
        return None
    import yaml

    try:
        with open(name) as f:
            cfg = yaml.safe_load(f) or {}
    except Exception:  # lm-eval YAMLs may use !function tags; fall back to nothing
        return None
    task = cfg.get("task") or cfg.get("group")
    return rows.get(task) if isinstance(task, str) else None


def _model_device(model):
    import torch

    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
