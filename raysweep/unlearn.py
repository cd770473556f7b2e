"""``python -m raysweep.unlearn --config FILE [--set k=v …]``: one unlearning run, no Ray.

The YAML is a sweep file (a search-space file with single values is fine); the run uses its
``experiment`` section as it is, ``experiment.training.method`` naming the method.  Per-epoch
metrics are printed as they come.  On CPU, a file that sets ``search.resources.cpus_per_worker``
runs with that many torch threads, as a sweep trial does, so that a sweep's ``best.yaml`` (or a
``raysweep.report --export-trial`` file) reproduces the trial's metrics exactly.
"""

from __future__ import annotations

import argparse
import json
import sys

from raysweep.config import fail, load_or_exit


def _print_epoch(report) -> None:
    m = report.metrics
    head = {k: m[k] for k in ("epoch", "objective", "MU", "FE") if k in m}
    print(json.dumps({**head, **{k: v for k, v in sorted(m.items()) if k not in head}}, default=float))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.unlearn", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (its experiment section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. experiment.training.lr=1e-3")
    parser.add_argument("--method", help="shortcut for --set experiment.training.method=NAME")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"experiment.training.method={args.method}")
    cfg = load_or_exit(args.config, overrides)
    from raysweep.scenarios import preflight_data

    preflight_data(cfg.experiment)
    resources = cfg.search.resources
    if not resources.use_gpu and "cpus_per_worker" in resources.model_fields_set:
        import torch

        torch.set_num_threads(max(1, int(resources.cpus_per_worker)))  # what the trial's worker had
    if cfg.experiment.training.liger:
        import torch

        if not torch.cuda.is_available():
            fail(args.config, "experiment.training.liger", "true needs a CUDA GPU (Liger's kernels are Triton); none is visible")

    from raysweep.runner import run_experiment
    from raysweep.train import DivergenceError

    try:
        result = run_experiment(cfg.experiment, _print_epoch, use_gpu=cfg.search.resources.use_gpu)
    except DivergenceError as err:
        print(f"error: run diverged: {err}", file=sys.stderr)
        return 1
    if result.best is not None:
        print("best epoch:", json.dumps({k: result.best[k] for k in ("epoch", "objective", "MU", "FE") if k in result.best}))
    if result.checkpoint:
        print("checkpoint:", result.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
