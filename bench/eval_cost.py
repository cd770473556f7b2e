"""Evaluation cost: one full evaluation against the bare model passes it needs, with a profile.

    python bench/eval_cost.py [--space search_spaces/tiny.yaml] [--model embedded] [--repeats 3]
                              [--threads N]

Loads the model and builds the :class:`raysweep.eval.evaluate.Evaluator` of the YAML's experiment
(set-up — embedder load, the retain model's truth ratios for Forget Quality — is timed apart:
a trial pays it once, not per epoch). Then runs the per-epoch evaluation ``--repeats`` times
after one warm-up, with the model passes timed in place: ``model.generate`` (generation for
R/TE/CS/ES), ``model.forward`` outside generate (the batched likelihood passes for P/TR and the
MIA scores), and the sentence embedder's ``encode`` (CS). Everything else (tokenization,
ROUGE, entropy, the NLI shortcut, bookkeeping) is the evaluation's overhead:

    ratio = full evaluation wall time / time inside the model passes   (target <= 1.3)

The ratio is also given against the language model's passes alone. A cProfile of one more
evaluation lists where the non-model time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PassTimer:
    """Times the outermost call of wrapped methods (a forward inside generate counts as generate)."""

    def __init__(self):
        self.depth = 0
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, label: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            if self.depth:
                return original(*args, **kwargs)
            self.depth += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1
                self.depth -= 1

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "tiny.yaml"))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from raysweep.config import load_or_exit
    from raysweep.eval.evaluate import Evaluator
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import load_run_data, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_or_exit(args.space, [f"experiment.model.name_or_path={args.model}"]).experiment
    resolved = resolve(cfg)
    data = load_run_data(cfg, resolved)
    model = load_model(resolved.model, dtype="float32").eval()
    tokenizer = load_tokenizer(resolved.model)
    started = time.perf_counter()
    evaluator = Evaluator(cfg, data.eval_sets, retain_model=resolved.retain_model, data_dir=resolved.data_dir)
    if evaluator.embedder is not None:
        evaluator.embedder.model  # load it now (lazily loaded otherwise): part of set-up
    setup_s = time.perf_counter() - started

    timer = PassTimer()
    timer.wrap(model, "generate", "generate")
    timer.wrap(model, "forward", "forward")
    if evaluator.embedder is not None:
        timer.wrap(evaluator.embedder.model, "encode", "embed")

    sizes = {name: len(s.records) for name, s in data.eval_sets.items()}
    print(f"model {resolved.model}; sets {sizes}; torch threads {torch.get_num_threads()}; "
          f"evaluator set-up {setup_s:.2f} s", flush=True)
    with torch.no_grad():
        evaluator(model, tokenizer)  # warm-up
        runs = []
        for _ in range(args.repeats):
            timer.reset()
            t0 = time.perf_counter()
            metrics, _ = evaluator(model, tokenizer)
            total = time.perf_counter() - t0
            runs.append({"total": total, **timer.seconds, "calls": dict(timer.calls)})
        profiler = cProfile.Profile()
        profiler.enable()
        evaluator(model, tokenizer)
        profiler.disable()

    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in ("total", "generate", "forward", "embed")}
    lm = med["generate"] + med["forward"]
    passes = lm + med["embed"]
    print(f"\nmedian of {args.repeats} evaluations (objective {metrics['objective']:.4f}):")
    print("| full evaluation | generate | likelihood forward | embedder encode | other | ratio (all passes) | ratio (LM passes) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {med['total']:.2f} s | {med['generate']:.2f} s | {med['forward']:.2f} s | {med['embed']:.2f} s | "
          f"{med['total'] - passes:.2f} s | {med['total'] / passes:.3f} | {med['total'] / lm:.3f} |")
    print(f"calls per evaluation: {runs[-1]['calls']}")
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(25)
    print("\nprofile of one more evaluation (top 25 by own time):")
    print(stream.getvalue())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
