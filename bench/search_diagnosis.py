"""Why good configurations die early: ASHA's decisions replayed from recorded trial histories.

    python bench/search_diagnosis.py [docs/bench/search_efficiency_*.json ...]

No training: it reads the curves that ``bench/search_efficiency.py`` wrote (every reported epoch
of every trial, in the order Tune received them) and, for each TPE + ASHA sweep, replays Ray's
asynchronous successive halving rule on them (rungs at grace x rf^k < max_t = 5; a trial arriving
at a rung is stopped if its objective is below the (1 - 1/rf) quantile of the values recorded
there *before it*). The grace period and reduction factor come from the file name
(``_grace<g>`` / ``_rf<r>``). Per sweep it prints:

- how many rung decisions the replay reproduces (a replayed stop must be the trial's last epoch);
- **first-arrival passes**: trials that passed a rung because fewer than rf values were recorded
  there when they arrived, but are below the cut-off of the rung as it stood at the end of the
  sweep (the same rule applied to every trial that reached it);
- **unlucky stops**: trials stopped at a rung whose value is at or above that final cut-off;
- **method leaders stopped**: trials stopped at their first rung while being the best of their
  method at that rung so far;
- **duplicates**: pairs of trials with identical objectives (to 1e-12) at every common epoch —
  training is deterministic at the fixed ``training.seed``, so equal curves mean equal configs.

It also prints, for the grid arm, which (lr, 3 epochs) / (lr, 5 epochs) pairs have identical
epoch-1 objectives (the 1-epoch lr warm-up is the same for both; the schedules differ after it).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAX_T = 5  # the benchmark's longest trial (epochs)


def rungs(grace: int, rf: float, max_t: int = MAX_T) -> list[int]:
    """Ray's ASHA milestones (one bracket): grace x rf^k for k < int(log(max_t/grace)/log(rf) + 1)."""
    count = int(np.log(max_t / grace) / np.log(rf) + 1)
    return [int(grace * rf ** k) for k in range(count)]


def histories(curve: list[dict]) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    hist: dict[str, dict[int, float]] = defaultdict(dict)
    method: dict[str, str] = {}
    for row in curve:
        hist[row["trial"]][row["epoch"]] = row["objective"]
        method[row["trial"]] = row["method"]
    return hist, method


def replay(curve: list[dict], grace: int, rf: float) -> dict:
    hist, method = histories(curve)
    milestones = rungs(grace, rf)
    recorded: dict[int, dict[str, float]] = {m: {} for m in milestones}
    stopped: dict[str, int] = {}
    passes_early: list[tuple[str, int]] = []  # (trial, rung) passed with < rf values recorded
    leaders_stopped: list[tuple[str, str, float]] = []
    for row in curve:  # arrival order
        trial, epoch, value = row["trial"], row["epoch"], row["objective"]
        if trial in stopped or epoch not in recorded:
            continue
        at_rung = recorded[epoch]
        cutoff = np.nanpercentile(list(at_rung.values()), (1 - 1 / rf) * 100) if at_rung else None
        if len(at_rung) < rf:
            passes_early.append((trial, epoch))
        if cutoff is not None and value < cutoff:
            stopped[trial] = epoch
            same = [v for t, v in at_rung.items() if method[t] == method[trial]]
            if epoch == milestones[0] and all(value >= v for v in same):
                leaders_stopped.append((trial, method[trial], round(value, 4)))
        at_rung[trial] = value
    consistent = sum(max(hist[t]) == e for t, e in stopped.items())
    final_cut = {m: np.nanpercentile(list(r.values()), (1 - 1 / rf) * 100) for m, r in recorded.items() if r}
    lucky = [(t, m) for t, m in passes_early if t not in stopped or stopped[t] != m
             if m in final_cut and hist[t][m] < final_cut[m]]
    unlucky = [(t, e, round(hist[t][e], 4), round(final_cut[e], 4)) for t, e in stopped.items()
               if hist[t][e] >= final_cut[e]]
    return {"trials": len(hist), "trial_epochs": len(curve), "rungs": milestones,
            "stopped": len(stopped), "stops_consistent": consistent,
            "first_arrival_passes": len(passes_early),
            "first_arrival_passes_below_final_cutoff": lucky,
            "unlucky_stops": unlucky, "method_leaders_stopped": leaders_stopped,
            "duplicates": duplicates(hist)}


def duplicates(hist: dict[str, dict[int, float]]) -> list[tuple[str, str]]:
    out = []
    trials = sorted(hist)
    for i, a in enumerate(trials):
        for b in trials[i + 1:]:
            common = set(hist[a]) & set(hist[b])
            if common and all(abs(hist[a][e] - hist[b][e]) < 1e-12 for e in common):
                out.append((a, b))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*",
                        default=sorted(glob.glob(str(REPO / "docs" / "bench" / "search_efficiency_*.json"))))
    args = parser.parse_args()
    grid_done = False
    for file in args.files:
        name = Path(file).stem
        grace = int(re.search(r"_grace(\d+)", name).group(1))
        rf = float(m.group(1)) if (m := re.search(r"_rf(\d+)", name)) else 2.0
        for result in json.loads(Path(file).read_text()):
            if not grid_done:
                hist, _ = histories(result["grid"]["curve"])
                pairs = duplicates({t: {1: h[1]} for t, h in hist.items()})
                print(f"grid: {len(hist)} trials; identical epoch-1 objectives: {len(pairs)} pairs {pairs}")
                grid_done = True
            out = replay(result["tpe_asha"]["curve"], grace, rf)
            print(f"{name} seed {result['seed']} (grace {grace}, rf {rf:g}): {json.dumps(out)}")


if __name__ == "__main__":
    main()
