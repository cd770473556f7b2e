"""Continual unlearning (paper Section 5.2): N unlearning requests, one after another.

Step t unlearns forget subtask t starting from the model step t-1 left; its retain set is the
base retain split plus the subtasks not yet unlearned (``scenarios.load_step_data``).  After each
step the model is evaluated on the current subtask's forget set and the usual utility sets, and
the reporter gets one report per step (``metrics["step"]``), so ASHA acts on steps.

Reference for NPO/DPO/KL (``continual.reference``): ``previous`` (default, as the seed code) is
the model at the start of the step — no copy of the original model is kept after step 1;
``initial`` keeps a frozen copy of the original model for all steps (paper Fig. 7c), which is
itself a privacy risk: the original model still holds everything that was to be forgotten.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from raysweep.config import ExperimentConfig
from raysweep.models import load_model, load_tokenizer
from raysweep.scenarios import continual_tasks, load_step_data, resolve
from raysweep.train import EpochReport, Reporter, RunResult, run_unlearning


def step_objective(step_objectives: list[float], mode: str) -> float:
    """The trial's objective after some steps: their mean, or the last one."""
    return step_objectives[-1] if mode == "final" else sum(step_objectives) / len(step_objectives)


def run_continual(cfg: ExperimentConfig, reporter: Reporter | None = None, *, use_gpu: bool = False) -> RunResult:
    """Run every continual step; returns the per-step history (objective as configured)."""
    resolved = resolve(cfg)
    tasks = continual_tasks(cfg, resolved)
    tokenizer = load_tokenizer(resolved.model)
    use_ds = cfg.training.deepspeed is not None
    model = None if use_ds else load_model(resolved.model)
    initial = None
    if cfg.continual.reference == "initial":
        print(
            "warning: continual.reference=initial keeps a copy of the original model for the whole "
            "run; that copy still holds the data being forgotten (a privacy risk)",
            file=sys.stderr,
        )
        initial = load_model(resolved.model)

    result = RunResult()
    objectives: list[float] = []
    step_cfg = cfg
    for step, task in enumerate(tasks, start=1):
        data = load_step_data(cfg, resolved, tasks, step - 1)
        if use_ds:
            # Under DeepSpeed the model lives partitioned inside the engine: chain steps through
            # checkpoints (each step saves its final model, the next one loads it).
            out = Path(cfg.training.output_dir or Path("outputs") / cfg.name) / f"step{step}"
            step_cfg = step_cfg.model_copy(deep=True)
            step_cfg.training.save_checkpoint = "final"
            step_cfg.training.output_dir = out

        def step_reporter(report: EpochReport, step=step, task=task, n_retain=len(data.retain)) -> None:
            m = dict(report.metrics)
            objectives.append(m["objective"])
            m.update({
                "step": step,
                "task_id": task,
                "objective_step": m["objective"],
                "objective": step_objective(objectives, cfg.continual.objective),
                "data/retain_size": n_retain,
                "data/forget_size": len(data.forget),
            })
            result.history.append(m)
            if result.best is None or m["objective_step"] >= result.best["objective_step"]:
                result.best = m
            if reporter is not None:
                reporter(EpochReport(report.epoch, m, report.samples, report.checkpoint))

        step_result = run_unlearning(
            step_cfg, step_reporter, use_gpu=use_gpu, resolved=resolved, data=data, model=model,
            tokenizer=tokenizer, reference=initial, evaluate_epochs="last",
        )
        if use_ds:
            resolved = dataclasses.replace(resolved, model=step_result.checkpoint)
        else:
            model = step_result.model
            if hasattr(model, "merge_and_unload"):  # LoRA: fold the step's adapters in
                model = model.merge_and_unload()
        result.checkpoint = step_result.checkpoint
    result.model = model
    return result
