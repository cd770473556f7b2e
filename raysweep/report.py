"""``python -m raysweep.report``: paper-style tables and plots of a finished (or running) sweep.

::

    python -m raysweep.report EXPERIMENT_DIR_OR_MLFLOW_RUN_ID [--out DIR] [--mlflow-uri URI]

The command only; the report is :mod:`raysweep.sweep.report` (tables), :mod:`raysweep.sweep.plots`
and :mod:`raysweep.sweep.report_data` (its input); their names are re-exported here, where
they lived before.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from raysweep.sweep.plots import plot_mu_fe, plot_objective_history, plot_steps  # noqa: F401
from raysweep.sweep.report import (  # noqa: F401 - the names of the old module path
    FILES, METRIC_ORDER, NON_SET_PREFIXES, markdown, report_sweep, set_columns, write_report,
)
from raysweep.sweep.report_data import (  # noqa: F401
    CORE, ReportError, SweepData, TrialData, from_summaries, load_experiment, load_mlflow, pareto_points,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m raysweep.report",
                                     description="Tables (report.md) and plots of a raysweep sweep.")
    parser.add_argument("target", help="experiment directory (<storage>/<name>) or MLflow parent run id")
    parser.add_argument("--out", help="output directory (default: the experiment directory, or ./report-<run id>)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI, "
                                             "else sqlite:///mlflow.db in the current directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        target = Path(args.target).expanduser()
        if target.is_dir():
            data = load_experiment(target)
            out = Path(args.out) if args.out else target
        elif re.fullmatch(r"[0-9a-f]{8,64}", args.target):
            data = load_mlflow(args.target, args.mlflow_uri)
            out = Path(args.out) if args.out else Path(f"report-{args.target[:8]}")
        else:
            raise ReportError(f"{args.target}: neither an experiment directory nor an MLflow run id")
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = write_report(data, out)
    for file in files:
        print(file)
    return 0


if __name__ == "__main__":
    from raysweep.report import main as _main

    sys.exit(_main())
