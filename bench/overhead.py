"""Orchestration overhead: one unlearning run plain vs as a one-trial Ray Tune sweep.

    python bench/overhead.py [--space search_spaces/tiny.yaml] [--method ME+GD] [--epochs 5]

Runs the same fixed configuration twice — ``python -m raysweep.unlearn`` (no Ray) and
``python -m raysweep.tune`` with one trial and no scheduler (Ray start, Tune, Optuna, a
TorchTrainer, reporting) — and prints the wall time of each and their ratio. The embedded model
is built (or found in the cache) before timing, so neither run pays for it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


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
    ]
    sets = [x for item in fixed for x in ("--set", item)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # build / find the embedded model first, so neither timing includes it
        subprocess.run([sys.executable, "-c", "import sys; from raysweep.config import load_config; "
                        "from raysweep.scenarios import resolve; "
                        f"resolve(load_config({args.space!r}).experiment)"], check=True, cwd=tmp)
        plain = timed([sys.executable, "-m", "raysweep.unlearn", "--config", args.space, *sets], tmp)
        swept = timed([sys.executable, "-m", "raysweep.tune", "--space", args.space, *sets,
                       "--storage", str(tmp / "results"), "--name", "overhead",
                       "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"], tmp)
    result = {"method": args.method, "epochs": args.epochs, "unlearn_s": round(plain, 1),
              "tune_s": round(swept, 1), "ratio": round(swept / plain, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
