"""Issue #16's comparison: grid vs TPE + ASHA vs random + ASHA over seeds, at equal trial-epochs.

    python bench/search_compare.py --tpe docs/bench/search_efficiency_<tpe suffix>.json \\
        --random docs/bench/search_efficiency_<random suffix>.json [--out docs/bench/search_compare.png]

Both files come from ``bench/search_efficiency.py`` over the same seeds (e.g. ``--seeds 0 1 2 3 4
--grace auto --keep-best-per-method`` and the same with ``--sampler random``); the grid arm is the
one both files hold. Prints, per seed, each arm's best objective within the TPE arm's trial-epochs
(equal cost), and the issue's targets: (1) median over seeds of TPE + ASHA's best >= the grid's
best - 0.005 using <= 40 % of the grid's trial-epochs; (2) TPE + ASHA's best > random + ASHA's best
at the same budget in >= 4 of 5 seeds. Plots best-so-far against trial-epochs for the three arms,
median and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TARGET_FRACTION, TOLERANCE = 0.40, 0.005


def best_within(curve: list[dict], budget: int) -> float:
    """The best objective among the first ``budget`` trial-epochs (-inf if none)."""
    return max((r["objective"] for r in curve if r["trial_epochs"] <= budget), default=float("-inf"))


def band(curves: list[list[dict]], budget: int) -> tuple[list[int], list[float], list[float], list[float]]:
    xs = list(range(1, budget + 1))
    per_x = [[best_within(c, x) for c in curves] for x in xs]
    return xs, [statistics.median(v) for v in per_x], [min(v) for v in per_x], [max(v) for v in per_x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tpe", required=True)
    parser.add_argument("--random", required=True)
    parser.add_argument("--out", default=None, help="PNG (default: next to --tpe, search_compare.png)")
    args = parser.parse_args()
    tpe = {r["seed"]: r for r in json.loads(Path(args.tpe).read_text())}
    rnd = {r["seed"]: r for r in json.loads(Path(args.random).read_text())}
    seeds = sorted(set(tpe) & set(rnd))
    if not seeds:
        raise SystemExit("error: the two files share no seed")
    grid = tpe[seeds[0]]["grid"]
    grid_best, grid_epochs = grid["best"], grid["trial_epochs"]
    budget = int(TARGET_FRACTION * grid_epochs)

    print(f"grid: best {grid_best:.4f} in {grid_epochs} trial-epochs; budget {budget} trial-epochs "
          f"({TARGET_FRACTION:.0%})\n")
    print("| seed | TPE+ASHA best (all) | its trial-epochs | TPE+ASHA best within budget | "
          "random+ASHA best within budget | TPE > random |")
    print("| --- | --- | --- | --- | --- | --- |")
    within, wins = [], 0
    for seed in seeds:
        t_curve, r_curve = tpe[seed]["tpe_asha"]["curve"], rnd[seed]["tpe_asha"]["curve"]
        t_best, r_best = best_within(t_curve, budget), best_within(r_curve, budget)
        within.append(t_best)
        wins += t_best > r_best
        print(f"| {seed} | {tpe[seed]['tpe_asha']['best']:.4f} | {tpe[seed]['tpe_asha']['trial_epochs']} | "
              f"{t_best:.4f} | {r_best:.4f} | {'yes' if t_best > r_best else 'no'} |")
    # target 1 needs only the TPE arm: over every TPE seed, also those the random arm lacks
    tpe_within = [best_within(tpe[s]["tpe_asha"]["curve"], budget) for s in sorted(tpe)]
    median = statistics.median(tpe_within)
    print(f"\ntarget 1 (median over the {len(tpe)} TPE seeds of TPE+ASHA's best within {budget} trial-epochs "
          f">= {grid_best - TOLERANCE:.4f}): {median:.4f} -> {'met' if median >= grid_best - TOLERANCE else 'NOT met'}")
    if len(seeds) >= 5:
        need = -(-4 * len(seeds) // 5)
        print(f"target 2 (TPE > random at the same budget in >= {need} of {len(seeds)} seeds): {wins} -> "
              f"{'met' if wins >= need else 'NOT met'}")
    else:  # fewer than 5 shared seeds: say what is decided already, not a verdict
        losses = len(seeds) - wins
        state = (f"NOT met: TPE did not beat random in {losses} seeds already (at most 1 of 5 allowed)" if losses > 1
                 else f"undecided: {5 - len(seeds)} seed(s) still to run")
        print(f"target 2 (TPE > random at the same budget in >= 4 of 5 seeds): {wins} of {len(seeds)} "
              f"shared seeds so far -> {state}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step([r["trial_epochs"] for r in grid["curve"]], [r["best"] for r in grid["curve"]], where="post",
            color="black", linewidth=2, label="grid (the paper's protocol)")
    longest = max(max(len(tpe[s]["tpe_asha"]["curve"]), len(rnd[s]["tpe_asha"]["curve"])) for s in seeds)
    for name, arm, color in (("TPE + ASHA", tpe, "tab:blue"), ("random + ASHA", rnd, "tab:orange")):
        xs, med, low, high = band([arm[s]["tpe_asha"]["curve"] for s in seeds], longest)
        ax.step(xs, med, where="post", color=color, label=f"{name}, median of {len(seeds)} seeds")
        ax.fill_between(xs, low, high, step="post", color=color, alpha=0.2)
    ax.axvline(budget, color="tab:red", linestyle="--", label=f"{TARGET_FRACTION:.0%} of the grid's trial-epochs")
    ax.set_ylim(bottom=max(0.4, ax.get_ylim()[0]))
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best objective so far, (MU + FE) / 2")
    ax.set_title("Grid vs TPE + ASHA vs random + ASHA (median and range over seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.tpe).with_name("search_compare.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
