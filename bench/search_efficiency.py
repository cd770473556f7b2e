"""Search efficiency: the paper's grid against TPE + ASHA, in trial-epochs, on the embedded default.

    python bench/search_efficiency.py [--seeds 0 1 2] [--grace 1|auto] [--startup N] [--tpe-space wide|grid-box]
                                      [--reduction-factor 2] [--keep-best-per-method] [--revisit]
                                      [--metric last|best_so_far] [--sampler tpe|random] [--shared-params auto]
                                      [--space search_spaces/tiny.yaml] [--out docs/bench] [--work DIR]
                                      [--grid-json docs/bench/search_efficiency_<suffix>.json]

For each seed, two sweeps of ``python -m raysweep.tune`` over ME+GD and NPO+GD on the same
embedded model, with the paper's α = 0.1 (ME+GD), α = 1, β = 0.1 (NPO+GD) fixed in both:

- **grid** (``search.algorithm: grid``, no scheduler): the paper's protocol — 3 learning rates
  × {3, 5} epochs per method, 12 trials, 48 trial-epochs. The paper's 1e-5 / 2e-5 / 5e-5 for 7B
  models are scaled to the tiny model's range as 4e-4 / 8e-4 / 2e-3 (same 1 : 2 : 5 ratios).
- **TPE + ASHA** (``algorithm: optuna``, ASHA grace ``--grace`` epochs (default 1, the earlier
  runs'; ``auto``: after the warm-up), reduction factor 2, the issue #16 guards off unless
  ``--keep-best-per-method`` / ``--revisit`` / ``--metric best_so_far``; ``--sampler random``: the
  baseline, every trial a random start-up trial), the same number of trials (12), no enqueued defaults (so that it gets no
  grid point for free), over ``--tpe-space``: ``wide`` (tiny.yaml's ranges: lr log-uniform over
  [1e-4, 3e-3], epochs 2–5 sampled) or ``grid-box`` (lr log-uniform over the grid's span
  [4e-4, 2e-3], epochs fixed at the grid's longest, 5, and cut short by ASHA: epochs as the
  budget ASHA allocates rather than a hyperparameter).

The seeds are TPE's (``search.seed``); training uses the YAML's fixed ``experiment.training.seed``
in both arms, so both search the same objective landscape and the grid — whose 12 configurations
do not depend on a seed — runs once and is the reference for every TPE seed. Every reported epoch is one
trial-epoch; the curves order all epochs of a sweep by the time Tune received them (two
trials run at once). The figure of merit is the number of trial-epochs TPE + ASHA needs to
reach the grid's best objective (of the same seed), as a fraction of the grid's 48 (target
≤ 40 %). Writes ``search_efficiency<suffix>.{json,png}`` (``TpeArm.suffix``) under ``--out`` and prints
a Markdown table; finished sweeps in ``--work`` are reused when rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = "[ME+GD, NPO+GD]"
FIXED = "forget_coeff: 1.0, beta: 0.1"  # NPO+GD: α = 1 (paper); ME+GD: α = 0.1 via overrides
GRID_LRS = (4e-4, 8e-4, 2e-3)
GRID_EPOCHS = (3, 5)
TARGET = 0.40


TPE_SPACES = {
    # the tiny.yaml ranges: wider than the grid in lr, and epochs searched as a hyperparameter
    "wide": "lr: {loguniform: [1.0e-4, 3.0e-3]}, epochs: {int: [2, 5]}",
    # the grid's own box: lr continuous over the grid's span; epochs fixed at the grid's longest,
    # so that ASHA, not the sampler, decides how many epochs a trial gets (epochs as budget)
    "grid-box": f"lr: {{loguniform: [{min(GRID_LRS):g}, {max(GRID_LRS):g}]}}, epochs: {max(GRID_EPOCHS)}",
}


@dataclass(frozen=True)
class TpeArm:
    """The TPE + ASHA settings under test (the grid arm has none)."""

    grace: str = "1"  # ASHA grace period, epochs, or "auto" (after the warm-up)
    startup: int | None = None  # TPE's random start-up trials (None: raysweep's default)
    tpe_space: str = "wide"  # a TPE_SPACES key
    reduction_factor: int = 2  # ASHA's
    # issue #16's guards (search.scheduler.*); off = the scheduler of the earlier runs
    keep_best: bool = False
    revisit: bool = False
    metric: str = "last"
    sampler: str = "tpe"  # random: every trial a TPE start-up trial (random search, same ASHA)
    shared: str = "none"  # search.shared_params: auto = one lr / epochs for both methods in TPE

    def suffix(self) -> str:
        """Run-name suffix; the settings of earlier runs keep their earlier names."""
        startup = self.startup
        if startup is None:  # raysweep's default for this budget
            from raysweep.config import SearchConfig

            startup = SearchConfig(num_samples=len(GRID_LRS) * len(GRID_EPOCHS) * 2).startup_trials()
        return (f"_grace{self.grace}" + ("_random" if self.sampler == "random" else f"_startup{startup}")
                + ("" if self.tpe_space == "wide" else "_" + self.tpe_space.replace("-", ""))
                + ("" if self.reduction_factor == 2 else f"_rf{self.reduction_factor}")
                + ("_keepbest" if self.keep_best else "") + ("_revisit" if self.revisit else "")
                + ("_bestsofar" if self.metric == "best_so_far" else "")
                + ("" if self.shared == "none" else f"_shared{self.shared}"))

    def label(self) -> str:
        startup = "default" if self.startup is None else self.startup
        shared = "" if self.shared == "none" else f", shared {self.shared}"
        search = "random" if self.sampler == "random" else f"TPE ({startup} start-up, {self.tpe_space}{shared})"
        guards = [g for g, on in (("keep best/method", self.keep_best), ("revisit", self.revisit),
                                  ("best so far", self.metric == "best_so_far")) if on]
        return (f"{search} + ASHA (grace {self.grace}, rf {self.reduction_factor}"
                + (", " + ", ".join(guards) if guards else "") + ")")


def sweep_args(arm: str, seed: int, tpe: TpeArm = TpeArm()) -> list[str]:
    common = [
        f"search.methods={METHODS}",
        "search.overrides={ME+GD: {forget_coeff: 0.1}}",
        "search.max_concurrent=2",
        "search.enqueue_defaults=false",
        f"search.seed={seed}",
        "tracking.log_generations=false",
    ]
    if arm == "grid":
        lrs = ", ".join(f"{lr:g}" for lr in GRID_LRS)
        epochs = ", ".join(str(e) for e in GRID_EPOCHS)
        specific = [
            "search.algorithm=grid",
            f"search.space={{lr: {{choice: [{lrs}]}}, epochs: {{choice: [{epochs}]}}, {FIXED}}}",
            "search.scheduler.type=none",
        ]
    else:
        specific = [
            "search.algorithm=optuna",
            f"search.space={{{TPE_SPACES[tpe.tpe_space]}, {FIXED}}}",
            f"search.scheduler={{type: asha, grace_period: {tpe.grace}, reduction_factor: {tpe.reduction_factor}, "
            f"keep_best_per_method: {str(tpe.keep_best).lower()}, revisit: {str(tpe.revisit).lower()}, "
            f"metric: {tpe.metric}}}",
            f"search.num_samples={len(GRID_LRS) * len(GRID_EPOCHS) * 2}",
        ]
        if tpe.shared != "none":
            specific.append(f"search.shared_params={tpe.shared}")
        if tpe.sampler == "random":  # all trials TPE start-up trials: random search
            specific.append(f"search.tpe_startup_trials={len(GRID_LRS) * len(GRID_EPOCHS) * 2}")
        elif tpe.startup is not None:
            specific.append(f"search.tpe_startup_trials={tpe.startup}")
    return [part for item in common + specific for part in ("--set", item)]


def run_sweep(space: str, arm: str, seed: int, work: Path, tpe: TpeArm = TpeArm()) -> tuple[Path, float]:
    name = "grid" if arm == "grid" else f"{arm}-seed{seed}" + tpe.suffix()
    path = work / "results" / name
    log = work / f"{name}.log"
    if (path / "trials.json").is_file():
        print(f"[bench] {name}: reusing {path}", flush=True)
        return path, float("nan")
    cmd = [sys.executable, "-m", "raysweep.tune", "--space", space, "--storage", str(work / "results"),
           "--name", name, "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}", *sweep_args(arm, seed, tpe)]
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"[bench] {name} failed ({proc.returncode}); see {log}")
    print(f"[bench] {name}: {seconds:.0f} s", flush=True)
    return path, seconds


def curve(path: Path) -> list[dict]:
    """Every reported epoch of a sweep, in arrival order, with the best objective so far."""
    from ray.tune import ExperimentAnalysis

    from raysweep.sweep.results import sampled_params  # a grid trial nests its point under grid_point

    analysis = ExperimentAnalysis(str(path))
    rows = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        if frame is None:
            frame = analysis.trial_dataframes.get(trial.path)
        if frame is None or frame.empty:
            continue
        for record in frame.to_dict("records"):
            if record.get("objective") is None:
                continue
            rows.append({"time": float(record["timestamp"]), "trial": trial.trial_id,
                         "method": sampled_params(trial.config).get("method"), "epoch": int(record["training_iteration"]),
                         "objective": float(record["objective"])})
    rows.sort(key=lambda r: (r["time"], r["trial"], r["epoch"]))
    best = float("-inf")
    for i, row in enumerate(rows, start=1):
        best = max(best, row["objective"])
        row.update(trial_epochs=i, best=best)
    return rows


def epochs_to_reach(rows: list[dict], target: float) -> int | None:
    return next((r["trial_epochs"] for r in rows if r["best"] >= target), None)


def plot(results: list[dict], out: Path, tpe: TpeArm) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results[0]["grid"]["curve"]
    ax.step([r["trial_epochs"] for r in rows], [r["best"] for r in rows], where="post", color="black",
            linewidth=2, label="grid (3 lr x {3, 5} epochs per method)")
    for result, color in zip(results, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")):
        rows = result["tpe_asha"]["curve"]
        ax.step([r["trial_epochs"] for r in rows], [r["best"] for r in rows], where="post", color=color,
                alpha=0.85, label=f"seed {result['seed']}")
    grid_total = max(r["grid"]["trial_epochs"] for r in results)
    ax.axvline(TARGET * grid_total, color="tab:red", linestyle="--", label=f"{TARGET:.0%} of the grid's trial-epochs")
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best objective so far, (MU + FE) / 2")
    ax.set_title(f"Search efficiency on the embedded default ({len(results)} seeds)")
    ax.legend(loc="lower right", fontsize="small", title=tpe.label(), title_fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "tiny.yaml"))
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    parser.add_argument("--grace", default="1", help="ASHA grace period (epochs, or auto) of the TPE + ASHA arm")
    parser.add_argument("--startup", type=int, default=None,
                        help="search.tpe_startup_trials of the TPE arm (default: raysweep's, num_samples // 4)")
    parser.add_argument("--tpe-space", choices=sorted(TPE_SPACES), default="wide",
                        help="wide: tiny.yaml's ranges (epochs sampled); grid-box: the grid's lr span, "
                             "epochs fixed at its longest and cut by ASHA")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA's reduction factor")
    parser.add_argument("--keep-best-per-method", action="store_true", help="search.scheduler.keep_best_per_method")
    parser.add_argument("--revisit", action="store_true", help="search.scheduler.revisit")
    parser.add_argument("--metric", choices=["last", "best_so_far"], default="last", help="search.scheduler.metric")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe",
                        help="random: the baseline arm, random search with the same ASHA")
    parser.add_argument("--shared-params", default="none",
                        help="search.shared_params of the TPE arm (none | auto | a YAML list)")
    parser.add_argument("--grid-json", default=None,
                        help="take the grid arm from an earlier search_efficiency*.json (same code and model) "
                             "instead of running it again")
    parser.add_argument("--work", default=None, help="where sweeps go (kept; rerunning reuses finished ones)")
    args = parser.parse_args()
    work = Path(args.work or (Path.cwd() / "bench-search-efficiency")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = str(Path(args.space).resolve())

    # build (or find) the embedded model once, before any timing
    from raysweep.config import load_config
    from raysweep.scenarios import ensure_embedded_for

    ensure_embedded_for(load_config(space).experiment)
    tpe = TpeArm(str(args.grace), args.startup, args.tpe_space, args.reduction_factor,
                 args.keep_best_per_method, args.revisit, args.metric, args.sampler, args.shared_params)
    suffix = tpe.suffix()

    def arm_result(arm: str, seed: int) -> dict:
        path, seconds = run_sweep(space, arm, seed, work, tpe)
        rows = curve(path)
        return {"path": str(path), "wall_s": round(seconds, 1), "trial_epochs": len(rows),
                "best": max(r["objective"] for r in rows), "curve": rows}

    if args.grid_json:  # the grid does not depend on the search seed: reuse a recorded one
        grid = json.loads(Path(args.grid_json).read_text())[0]["grid"]
        print(f"[bench] grid: from {args.grid_json} (best {grid['best']:.4f}, {grid['trial_epochs']} trial-epochs)",
              flush=True)
    else:
        grid = arm_result("grid", 0)
    results = []
    for seed in args.seeds:
        result = {"seed": seed, "grid": grid, "tpe_asha": arm_result("tpe_asha", seed)}
        needed = epochs_to_reach(result["tpe_asha"]["curve"], result["grid"]["best"])
        result["tpe_epochs_to_grid_best"] = needed
        result["fraction_of_grid"] = None if needed is None else needed / result["grid"]["trial_epochs"]
        results.append(result)
        (out / f"search_efficiency{suffix}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"search_efficiency{suffix}.png", tpe)

    print("\n| seed | grid best | grid trial-epochs | TPE+ASHA best | TPE+ASHA trial-epochs | "
          "TPE+ASHA trial-epochs to the grid's best | fraction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        needed = r["tpe_epochs_to_grid_best"]
        frac = "not reached" if needed is None else f"{r['fraction_of_grid']:.0%}"
        print(f"| {r['seed']} | {r['grid']['best']:.4f} | {r['grid']['trial_epochs']} | {r['tpe_asha']['best']:.4f} | "
              f"{r['tpe_asha']['trial_epochs']} | {needed if needed is not None else '-'} | {frac} |")
    reached = [r["fraction_of_grid"] for r in results if r["fraction_of_grid"] is not None]
    verdict = "met" if len(reached) == len(results) and max(reached) <= TARGET else "NOT met"
    print(f"\ntarget (TPE + ASHA reaches the grid's best with <= {TARGET:.0%} of its trial-epochs, every seed): {verdict}")
    print(f"wrote {out / f'search_efficiency{suffix}.json'} and {out / f'search_efficiency{suffix}.png'}")


if __name__ == "__main__":
    main()
