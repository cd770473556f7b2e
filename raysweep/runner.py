"""One trial, whatever the scenario: the entry point that ``unlearn`` and each Ray Train rank call.

``fictitious`` and ``real_world`` are one unlearning run (``train.run_unlearning``);
``continual`` chains one run per forget subtask (``continual.run_continual``).  Downstream
lm-eval tasks, when configured, run once at the end on the final model and are added to the
last report's metrics (``downstream/<task>``; optionally folded into the objective).
"""

from __future__ import annotations

from raysweep.config import ExperimentConfig
from raysweep.eval.metrics import objective
from raysweep.train import EpochReport, Reporter, RunResult, run_unlearning


def run_experiment(cfg: ExperimentConfig, reporter: Reporter | None = None, *, use_gpu: bool = False) -> RunResult:
    downstream = cfg.eval.downstream
    if downstream is None:
        return _run(cfg, reporter, use_gpu)

    # Hold back the last report until the downstream scores are in, so that Tune, MLflow and
    # the objective see them at the final epoch / step.
    held: list[EpochReport] = []

    def holding(report: EpochReport) -> None:
        if held and reporter is not None:
            reporter(held.pop())
        held.append(report)

    if cfg.training.deepspeed is not None and cfg.training.save_checkpoint == "none":
        cfg = cfg.model_copy(deep=True)
        cfg.training.save_checkpoint = "final"  # downstream reads the gathered final model
    result = _run(cfg, holding, use_gpu)
    scores = _downstream_scores(cfg, result)
    last = held.pop()
    last.metrics.update(scores)
    if cfg.eval.objective_includes_downstream:
        last.metrics["objective"] = objective(last.metrics["MU"], last.metrics["FE"], *scores.values())
    if result.history:
        result.history[-1].update(last.metrics)
    if reporter is not None:
        reporter(last)
    return result


def _run(cfg: ExperimentConfig, reporter, use_gpu: bool) -> RunResult:
    if cfg.scenario == "continual":
        from raysweep.continual import run_continual

        return run_continual(cfg, reporter, use_gpu=use_gpu)
    return run_unlearning(cfg, reporter, use_gpu=use_gpu)


def _downstream_scores(cfg: ExperimentConfig, result: RunResult) -> dict[str, float]:
    """lm-eval scores of the final model, the same on every rank.

    Without DeepSpeed every rank holds the whole model and scores it (identical results).
    Under DeepSpeed the in-memory model is partitioned, which lm-eval cannot use: rank 0 scores
    the gathered final checkpoint and broadcasts the scores to the other ranks.
    """
    import torch
    import torch.distributed as dist

    from raysweep.eval.downstream import run_downstream

    if cfg.training.deepspeed is None:
        return run_downstream(result.model, _tokenizer_for(cfg), cfg.eval.downstream)
    from raysweep.models import load_model, load_tokenizer

    distributed = dist.is_available() and dist.is_initialized()
    box: list = [None]
    if not distributed or dist.get_rank() == 0:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        model = load_model(result.checkpoint, dtype=dtype).to(device)
        box[0] = run_downstream(model, load_tokenizer(result.checkpoint), cfg.eval.downstream)
        del model
    if distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _tokenizer_for(cfg: ExperimentConfig):
    from raysweep.models import load_tokenizer
    from raysweep.scenarios import resolve

    return load_tokenizer(resolve(cfg).model)
