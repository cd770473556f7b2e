"""Orchestration overhead: one unlearning run plain vs as a one-trial Ray Tune sweep.

    python bench/overhead.py [--space search_spaces/tiny.yaml] [--method ME+GD] [--epochs 5]

Runs the same fixed configuration twice — ``python -m raysweep.unlearn`` (no Ray) and
``python -m raysweep.tune`` with one trial and no scheduler (Ray start, Tune, Optuna, a
TorchTrainer, reporting, MLflow) — and prints the wall time of each and their ratio. Both get
the same compute: the trial's worker is given every core (``cpus_per_worker`` = the machine's
cores, which is also its torch thread count), as the plain run uses torch's default threads.
The embedded model is built (or found in the cache) before timing, so neither run pays for it.
Per run it also sums the per-epoch ``time/train_s`` and ``time/eval_s`` the worker reports, so
the overhead splits into fixed start-up/teardown and slower epochs.

The sweep's fixed part is split on its timeline (``timeline``; wall-clock seconds, from the
process start and end measured here, the trial's RUNNING time and per-epoch result timestamps
in the trial's ``result.json``, and the trial's MLflow child run end):

* ``sweep_start``: process start → Tune sets the trial RUNNING (imports, Ray start, MLflow store,
  the searcher and the experiment directory);
* ``trial_start``: trial RUNNING → its first epoch begins (the trial actor, the Train controller,
  the worker group and its process group, model and evaluator set-up on the worker);
* ``between_epochs``: Σ over epochs of (time between two results − the epoch's training and
  evaluation): reporting through Train and Tune, MLflow logging;
* ``trial_end``: last result → MLflow child run ended (worker group and controller shutdown,
  the trial's completion through Tune);
* ``sweep_end``: MLflow child run ended → process exit (trials.json, the report, MLflow parent,
  Ray shutdown).

``trial_start + between_epochs + trial_end`` is the fixed cost every trial of a sweep pays;
``sweep_start + sweep_end`` is paid once per sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def child_run_end(db: Path) -> float:
    """The (single) trial's MLflow child run end, unix seconds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    if len(runs) != 1 or runs[0].info.end_time is None:
        sys.exit(f"expected one finished MLflow child run in {db}, found {len(runs)}")
    return runs[0].info.end_time / 1000.0


def timeline(trial: dict, process_start: float, process_end: float, trial_end: float) -> dict[str, float]:
    """The sweep's wall time split into its parts (see the module docstring), seconds."""
    rows = [json.loads(line) for line in (Path(trial["path"]) / "result.json").read_text().splitlines()
            if line.strip()]  # Tune's own rows: trials.json drops Tune's timestamps
    rows = [r for r in rows if "objective" in r]
    stamps = [float(r["timestamp"]) for r in rows]
    work = [float(r.get("time/train_s", 0.0)) + float(r.get("time/eval_s", 0.0)) for r in rows]
    started = float(trial["started"])
    parts = {
        "sweep_start": started - process_start,
        "trial_start": stamps[0] - work[0] - started,
        "epochs_train_eval": sum(work),
        "between_epochs": sum(b - a - w for a, b, w in zip(stamps, stamps[1:], work[1:])),
        "trial_end": trial_end - stamps[-1],
        "sweep_end": process_end - trial_end,
    }
    return {k: round(v, 1) for k, v in parts.items()}


def epoch_seconds(rows: list[dict]) -> tuple[float, float]:
    return (sum(float(r.get("time/train_s", 0.0)) for r in rows),
            sum(float(r.get("time/eval_s", 0.0)) for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "tiny.yaml"))
    parser.add_argument("--method", default="ME+GD")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    fixed = [
        f"experiment.training.method={args.method}",
        f"experiment.training.epochs={args.epochs}",
        f"experiment.training.lr={args.lr}",
        f"search.methods=[{args.method}]",
        f"search.space={{lr: {args.lr}, epochs: {args.epochs}}}",
        "search.overrides={}",
        "search.scheduler.type=none",
        "search.num_samples=1",
        "search.max_concurrent=1",
        "search.enqueue_defaults=false",
        f"search.resources.cpus_per_worker={os.cpu_count()}",
    ]
    sets = [x for item in fixed for x in ("--set", item)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # build / find the embedded model first, so neither timing includes it
        from raysweep.config import load_config
        from raysweep.scenarios import ensure_embedded_for

        ensure_embedded_for(load_config(args.space).experiment)
        plain, out = timed([sys.executable, "-m", "raysweep.unlearn", "--config", args.space, *sets], tmp)
        plain_rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        process_start = time.time()
        swept, _ = timed([sys.executable, "-m", "raysweep.tune", "--space", args.space, *sets,
                          "--storage", str(tmp / "results"), "--name", "overhead",
                          "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"], tmp)
        process_end = time.time()
        trials = json.loads((tmp / "results" / "overhead" / "trials.json").read_text())
        swept_rows = trials[0]["history"]
        parts = timeline(trials[0], process_start, process_end, child_run_end(tmp / "mlflow.db"))
    (p_train, p_eval), (s_train, s_eval) = epoch_seconds(plain_rows), epoch_seconds(swept_rows)
    result = {"method": args.method, "epochs": args.epochs, "threads": os.cpu_count(),
              "unlearn_s": round(plain, 1), "tune_s": round(swept, 1), "ratio": round(swept / plain, 3),
              "unlearn_train_eval_s": [round(p_train, 1), round(p_eval, 1)],
              "tune_train_eval_s": [round(s_train, 1), round(s_eval, 1)],
              "tune_fixed_s": round(swept - s_train - s_eval, 1), "unlearn_fixed_s": round(plain - p_train - p_eval, 1),
              "tune_timeline_s": parts,
              "tune_per_trial_fixed_s": round(parts["trial_start"] + parts["between_epochs"] + parts["trial_end"], 1),
              "tune_per_sweep_fixed_s": round(parts["sweep_start"] + parts["sweep_end"], 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
