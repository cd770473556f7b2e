"""``python -m raysweep.report``: paper-style tables and plots of a finished (or running) sweep.

::

    python -m raysweep.report EXPERIMENT_DIR_OR_MLFLOW_RUN_ID [--out DIR] [--mlflow-uri URI]
    python -m raysweep.report EXPERIMENT_DIR --export-trial TRIAL_ID [--out FILE]

``--export-trial`` writes that trial as an experiment file (default ``EXPERIMENT_DIR/<id>.yaml``;
:mod:`raysweep.sweep.export`) that ``python -m raysweep.unlearn --config FILE`` re-runs.

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
    parser.add_argument("--out", help="output directory (default: the experiment directory, or ./report-<run id>); "
                                      "with --export-trial, the YAML file")
    parser.add_argument("--export-trial", metavar="TRIAL_ID",
                        help="write this trial of EXPERIMENT_DIR as an experiment file for raysweep.unlearn")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI, "
                                             "else sqlite:///mlflow.db in the current directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.export_trial is not None:
        return export_trial(args)
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


def export_trial(args: argparse.Namespace) -> int:
    """``--export-trial``: the trial's YAML written, its path printed; exit 2 with one line if the
    directory or the trial is not there."""
    from raysweep.sweep.export import ExportError, write_trial_yaml

    if not Path(args.target).expanduser().is_dir():
        print(f"error: {args.target}: not an experiment directory (--export-trial needs one)", file=sys.stderr)
        return 2
    try:
        print(write_trial_yaml(str(Path(args.target).expanduser()), args.export_trial, args.out))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from raysweep.report import main as _main

    sys.exit(_main())
