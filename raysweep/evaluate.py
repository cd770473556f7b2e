"""``python -m raysweep.evaluate --model PATH_OR_ID --space FILE [--set k=v …] [--json OUT]``

Evaluates one model (no training) on the evaluation sets of the YAML's experiment: R, P, TR,
TE, CS, ES per set, MU, FE, objective, Forget Quality and membership-inference AUCs when
configured; prints them as a table.  ``--model embedded`` evaluates the embedded target model,
``--model embedded-retain`` its retain model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from raysweep.config import load_or_exit

METRICS = ("R", "P", "TR", "TE", "CS", "ES")


def metric_table(metrics: dict[str, float]) -> str:
    """Per-set rows x the six metrics, then the aggregates."""
    sets = sorted({k.split("/", 1)[0] for k in metrics if k.split("/", 1)[-1] in METRICS and "/" in k})
    lines = ["| set | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in sets:
        cells = [f"{metrics[f'{name}/{m}']:.4f}" if f"{name}/{m}" in metrics else "—" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in ("MU", "FE", "objective", "forget_quality"):
        if key in metrics:
            lines.append(f"{key}: {metrics[key]:.6g}")
    for key in sorted(k for k in metrics if k.startswith(("privacy/", "eval/", "downstream/"))):
        lines.append(f"{key}: {metrics[key]:.6g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysweep.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="hub id, local directory, 'embedded' or 'embedded-retain'")
    parser.add_argument("--space", required=True, help="sweep YAML whose experiment section names the data and eval")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", dest="json_out", help="also write metrics (and per-sample rows) to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.space, [*args.overrides, f"experiment.model.name_or_path={args.model}"]).experiment
    from raysweep.scenarios import preflight_data

    preflight_data(cfg)

    import torch

    from raysweep.eval.evaluate import Evaluator
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import load_run_data, resolve

    resolved = resolve(cfg)
    data = load_run_data(cfg, resolved)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    model = load_model(resolved.model, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(resolved.model)
    started = time.perf_counter()
    evaluator = Evaluator(cfg, data.eval_sets, retain_model=resolved.retain_model,
                          data_dir=resolved.data_dir, device=device)
    with torch.no_grad():
        metrics, samples = evaluator(model, tokenizer)
    metrics["time/eval_s"] = time.perf_counter() - started
    print(f"model: {resolved.model}")
    print(metric_table(metrics))
    print(f"evaluation wall time: {metrics['time/eval_s']:.1f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": resolved.model, "metrics": metrics, "samples": samples}, f, indent=1)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
