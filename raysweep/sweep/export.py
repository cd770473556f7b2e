"""A trial as an experiment file: ``best.yaml`` of every sweep, and ``python -m raysweep.report EXP
--export-trial ID``.

The file is a complete sweep YAML for one run: the trial's ``experiment`` section exactly as the
trial ran it (the sweep's experiment with the sampled values laid on top -- method, lr, epochs,
α, β, LoRA rank -- and ``training.seed``, the model, the data and the protocol), and a
``search`` section naming the method and the resources the trial had (on CPU the thread count,
which ``raysweep.unlearn`` applies as a trial does). ``python -m raysweep.unlearn --config FILE``
re-runs the trial: on CPU at the same seed its per-epoch metrics are the trial's to 1e-6
(tests/test_tune_embedded.py). A trial that ASHA stopped early is re-run over its whole planned
schedule; its epochs up to the stop are the ones it reported.
"""

from __future__ import annotations

from typing import Any

import yaml

from raysweep.config import ExperimentConfig, SweepConfig
from raysweep.sweep.space import trial_experiment
from raysweep.sweep.storage import read_json

BEST_YAML = "best.yaml"


class ExportError(Exception):
    """The trial or the sweep's files cannot be found (one line for the command)."""


def trial_experiment_of(experiment_path: str, summary: dict[str, Any], sweep: SweepConfig | None) -> ExperimentConfig:
    """What the trial ran: its ``experiment.json`` (written by the trial driver), else the sweep's
    experiment with the trial's sampled values (the same construction)."""
    saved = read_json(f"{summary['path']}/experiment.json") if summary.get("path") else None
    if saved is not None:
        cfg = ExperimentConfig.model_validate(saved)
    elif sweep is not None:
        cfg = trial_experiment(sweep.experiment, summary["params"])
    else:
        raise ExportError(f"{experiment_path}: neither the trial's experiment.json nor the sweep's sweep.json "
                          f"is there to rebuild trial {summary['trial_id']} from")
    cfg.training.output_dir = None  # the trial's directory is not the re-run's
    return cfg


def trial_document(experiment_path: str, summary: dict[str, Any], sweep: SweepConfig | None) -> str:
    """The YAML text of one trial (a comment header, then experiment/search)."""
    cfg = trial_experiment_of(experiment_path, summary, sweep)
    search: dict[str, Any] = {"methods": [cfg.training.method]}
    if sweep is not None:
        search["resources"] = sweep.search.resources.model_dump(mode="json")
    body = {"experiment": cfg.model_dump(mode="json"), "search": search}
    best = summary.get("best") or {}
    head = [
        f"# raysweep trial {summary['trial_id']} ({summary.get('trial_name')}) of the sweep {experiment_path}",
        f"# status {summary.get('status')}, early stopped: {summary.get('early_stopped')}; sampled: "
        + ", ".join(f"{k}={v}" for k, v in (summary.get("params") or {}).items()),
    ]
    if best:
        head.append(f"# its best epoch {summary.get('best_epoch')}: "
                    + ", ".join(f"{k} {best[k]:.6f}" for k in ("objective", "MU", "FE") if k in best))
    head.append("# re-run it: python -m raysweep.unlearn --config THIS_FILE")
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def load_sweep(experiment_path: str) -> SweepConfig | None:
    """The sweep's configuration as it ran (``sweep.json``), if the directory has it."""
    data = read_json(f"{experiment_path}/sweep.json")  # raysweep.tune.SWEEP_FILE
    return None if data is None else SweepConfig.model_validate(data)


def find_trial(experiment_path: str, trial_id: str, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``trials.json`` entry of ``trial_id`` (its id or its directory name)."""
    if summaries is None:
        summaries = read_json(f"{experiment_path}/trials.json")
        if summaries is None:
            raise ExportError(f"{experiment_path}: no trials.json (not a finished raysweep sweep?)")
    for summary in summaries:
        if trial_id in (summary["trial_id"], summary.get("trial_name")):
            return summary
    known = ", ".join(s["trial_id"] for s in summaries) or "none"
    raise ExportError(f"{experiment_path}: no trial {trial_id!r} (trials: {known})")


def write_trial_yaml(experiment_path: str, trial_id: str, out: str | None = None,
                     summaries: list[dict[str, Any]] | None = None) -> str:
    """Write one trial's experiment file (default ``<experiment>/<trial id>.yaml``); its path."""
    from raysweep.sweep.storage import write_text

    summary = find_trial(experiment_path, trial_id, summaries)
    path = out or f"{experiment_path}/{summary['trial_id']}.yaml"
    write_text(path, trial_document(experiment_path, summary, load_sweep(experiment_path)))
    return path
