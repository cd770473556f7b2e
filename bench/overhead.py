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
        swept, _ = timed([sys.executable, "-m", "raysweep.tune", "--space", args.space, *sets,
                          "--storage", str(tmp / "results"), "--name", "overhead",
                          "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"], tmp)
        trials = json.loads((tmp / "results" / "overhead" / "trials.json").read_text())
        swept_rows = trials[0]["history"]
    (p_train, p_eval), (s_train, s_eval) = epoch_seconds(plain_rows), epoch_seconds(swept_rows)
    result = {"method": args.method, "epochs": args.epochs, "threads": os.cpu_count(),
              "unlearn_s": round(plain, 1), "tune_s": round(swept, 1), "ratio": round(swept / plain, 3),
              "unlearn_train_eval_s": [round(p_train, 1), round(p_eval, 1)],
              "tune_train_eval_s": [round(s_train, 1), round(s_eval, 1)],
              "tune_fixed_s": round(swept - s_train - s_eval, 1), "unlearn_fixed_s": round(plain - p_train - p_eval, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
