"""The Ray side of raysweep: every module here imports only the ones listed above it.

``storage`` (paths, JSON/text on local disk or ``s3://``) · ``results`` (trial statuses, Tune's
key lists, sampled parameters, the best row, the one Pareto front, early stopping, error
reasons) · ``space`` (the Optuna search space, searcher, ASHA) · ``cluster`` (preflight checks,
Ray start-up, trial fits) · ``summary`` (trials read back from Tune's experiment directory,
``best.json``, the results table) · ``mlflow_store`` (MLflow client and run helpers) ·
``generations`` (the generations tables logged by a trial's rank 0) · ``tracking`` (the parent
run, the Tune callback) · ``trial`` (the Tune trainable and the Train worker) · ``tuner`` (the
Tuner, new or restored) · ``report_data`` (a sweep's results read back for the report) ·
``plots`` · ``report`` (report.md and the plots written).

The CLI modules ``raysweep.tune`` and ``raysweep.report`` sit on top; the old module paths
(``raysweep.tracking``, ``raysweep.trial``) re-export these names, because Tune pickles them
in experiment state that ``--resume`` reads back.
"""
