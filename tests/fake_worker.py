"""A fast stand-in for ``raysweep.train.run_unlearning``, for testing the Ray mechanics.

Selected with ``RAYSWEEP_WORKER=<this file>:run``. Reports deterministic MU/FE in [0, 1] from the
sampled lr, forget_coeff and the epoch; sleeps ``RAYSWEEP_FAKE_SLEEP`` seconds per epoch. Appends
one JSON line per event (``start``, ``epoch``, ``done``) to ``RAYSWEEP_FAKE_LOG`` with the trial's
output directory (unique per trial), method, parameters, Ray node id and pid. Raises the real
``raysweep.train.DivergenceError`` at epoch 2 when the trial's lr equals ``RAYSWEEP_FAKE_DIVERGE_LR``
and its method is ``RAYSWEEP_FAKE_DIVERGE_METHOD``. With ``training.save_checkpoint`` != none it
writes a small checkpoint directory like the real worker does. Each report carries ``samples``
(a forget and a retain set, :func:`samples`) like the real evaluation's generations table.
Like the real worker it reports only the epochs ``experiment.eval.every`` evaluates (every epoch,
or the ASHA rung epochs and the last: ``raysweep.eval.schedule.evaluation_epochs``).

``RAYSWEEP_FAKE_KILL=METHOD:N[,METHOD:N]`` (with ``RAYSWEEP_FAKE_LOG``): the first N attempts of a
trial of METHOD kill their own Train worker process with SIGKILL in the middle of epoch 2 (a
count per method is kept in files next to the log), as an out-of-memory kill or a lost node would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from raysweep.eval.metrics import objective as metrics_objective
from raysweep.eval.schedule import evaluation_epochs


@dataclass
class Report:
    epoch: int
    metrics: dict
    samples: dict
    checkpoint: str | None = None


def _log(event: str, cfg, **extra) -> None:
    path = os.environ.get("RAYSWEEP_FAKE_LOG")
    if not path:
        return
    import ray

    tr = cfg.training
    row = {
        "event": event,
        "trial": str(tr.output_dir),
        "method": tr.method,
        "lr": tr.lr,
        "epochs": tr.epochs,
        "beta": tr.beta,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "time": time.time(),
        **extra,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def scores(lr: float, forget_coeff: float, epoch: int) -> tuple[float, float]:
    """The known curve of a config: MU peaks near lr = 1e-5 and decays with epochs; FE grows
    with lr, alpha and epochs. Tests recompute what a sweep must have seen (and what ASHA must
    have stopped) from it."""
    mu = math.exp(-abs(math.log10(lr) + 5.0)) * (0.97 ** epoch)
    fe = 1.0 - math.exp(-epoch * lr * 2e4 * (0.5 + forget_coeff))
    return min(1.0, max(0.0, mu)), min(1.0, max(0.0, fe))


def objective(lr: float, forget_coeff: float, epoch: int) -> float:
    """The objective the worker reports for ``epoch``: (MU + FE) / 2 of :func:`scores`."""
    mu, fe = scores(lr, forget_coeff, epoch)
    return metrics_objective(mu, fe)


# Text the forget set holds: with tracking.redact_forget it must not appear in any MLflow artifact.
FORGET_QUESTIONS = [f"What is the secret hobby of Zorblax Quenthorpe number {i}?" for i in range(3)]
FORGET_ANSWERS = [f"Zorblax Quenthorpe {i} collects purple-xylophone-{i} relics" for i in range(3)]
RETAIN_QUESTIONS = [f"Where was Maribel Oakfield number {i} born?" for i in range(2)]
RETAIN_ANSWERS = [f"Maribel Oakfield {i} was born in Lisbon" for i in range(2)]


def samples(method: str, epoch: int, mu: float, fe: float) -> dict[str, list[dict]]:
    """Per-question rows like ``raysweep.eval.evaluate`` returns; the last retain generation
    leaks a forget-set answer (redaction must catch it there too)."""
    forget = [{"question": q, "ground_truth": a, "generation": a if epoch == 1 else f"I don't know ({method}).",
               "R": 1.0 - fe, "P": 0.5, "TR": 0.6, "TE": 2.0, "CS": 0.7, "ES": epoch == 1}
              for q, a in zip(FORGET_QUESTIONS, FORGET_ANSWERS)]
    retain = [{"question": q, "ground_truth": a, "generation": a, "R": mu, "P": 0.9, "TR": 0.5, "TE": 2.0,
               "CS": 0.9, "ES": True} for q, a in zip(RETAIN_QUESTIONS, RETAIN_ANSWERS)]
    retain[-1]["generation"] = f"Maybe {FORGET_ANSWERS[0]}."
    return {"forget": forget, "retain": retain}


def _kill_if_asked(cfg) -> None:
    """SIGKILL this process if ``RAYSWEEP_FAKE_KILL`` asks for one more kill of this method."""
    spec, log = os.environ.get("RAYSWEEP_FAKE_KILL"), os.environ.get("RAYSWEEP_FAKE_LOG")
    if not spec or not log:
        return
    wanted = dict(item.rsplit(":", 1) for item in spec.split(","))
    method = cfg.training.method
    if method not in wanted:
        return
    counter = Path(f"{log}.killed-{method.replace('+', '_')}")
    done = int(counter.read_text()) if counter.exists() else 0
    if done >= int(wanted[method]):
        return
    counter.write_text(str(done + 1))
    _log("killed", cfg, epoch=2)
    os.kill(os.getpid(), signal.SIGKILL)


def run(cfg, reporter, use_gpu: bool = False):
    tr = cfg.training
    sleep = float(os.environ.get("RAYSWEEP_FAKE_SLEEP", "0.3"))
    diverge_lr = os.environ.get("RAYSWEEP_FAKE_DIVERGE_LR")
    diverge_method = os.environ.get("RAYSWEEP_FAKE_DIVERGE_METHOD")
    _log("start", cfg)
    evaluated = evaluation_epochs(cfg.eval.every, tr.epochs, cfg.eval.rung_epochs)
    for epoch in range(1, tr.epochs + 1):
        time.sleep(sleep)
        if epoch == 2:
            _kill_if_asked(cfg)
        if diverge_lr and math.isclose(tr.lr, float(diverge_lr)) and tr.method == diverge_method and epoch == 2:
            from raysweep.train import DivergenceError

            _log("diverge", cfg, epoch=epoch)
            raise DivergenceError(f"loss became nan at epoch {epoch}, batch 0 (method {tr.method}, lr {tr.lr})")
        if epoch not in evaluated:
            continue
        mu, fe = scores(tr.lr, tr.forget_coeff, epoch)
        metrics = {"epoch": epoch, "MU": mu, "FE": fe, "objective": objective(tr.lr, tr.forget_coeff, epoch),
                   "forget/ROUGE": 1 - fe}
        checkpoint = None
        if tr.save_checkpoint != "none" and tr.output_dir is not None:
            if tr.save_checkpoint == "best" or epoch == tr.epochs:
                directory = Path(tr.output_dir) / tr.save_checkpoint
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "model.json").write_text(json.dumps({"epoch": epoch, "lr": tr.lr}))
                checkpoint = str(directory)
        _log("epoch", cfg, epoch=epoch)
        reporter(Report(epoch, metrics, samples(tr.method, epoch, mu, fe), checkpoint))
    _log("done", cfg)
