"""The report's plots (matplotlib, Agg): FE against MU per trial with the Pareto front, the best
objective against trials started, and MU / FE per continual step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raysweep.sweep.report_data import SweepData, _x, pareto_points
from raysweep.sweep.results import ERRORED, FINISHED


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_mu_fe(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    methods = data.methods()
    colors = _colors(methods)
    xs = [_x(r) for t in data.trials for r in t.history]
    if not xs:
        return False
    low, high = min(xs), max(xs)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    for t in sorted(data.trials, key=lambda t: t.order):
        rows = [r for r in t.history if isinstance(r.get("MU"), (int, float)) and isinstance(r.get("FE"), (int, float))]
        if not rows:
            continue
        mu, fe = [r["MU"] for r in rows], [r["FE"] for r in rows]
        sizes = [18 + 90 * ((_x(r) - low) / (high - low) if high > low else 0.5) for r in rows]
        color = colors[t.method]
        style = "-" if t.status == FINISHED else ":"
        ax.plot(mu, fe, style, color=color, alpha=0.55, linewidth=1.2)
        marker = {"marker": "o", "edgecolors": "white", "linewidths": 0.5} if t.status == FINISHED else {"marker": "x"}
        ax.scatter(mu, fe, s=sizes, color=color, alpha=0.8, zorder=3, **marker)
    front = pareto_points(data)
    if front:
        fx, fy = [r["MU"] for _, r in front], [r["FE"] for _, r in front]
        ax.plot(fx, fy, "--", color="black", linewidth=1.2, zorder=4)
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=1.5, zorder=5)
    ax.set_xlabel("MU (model utility)")
    ax.set_ylabel("FE (forget efficacy)")
    unit = "step" if data.continual else "epoch"
    ax.set_title(f"{data.title}: FE vs MU per trial (marker size grows with the {unit})", fontsize=10)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="-", label=m) for m in methods
               if any(t.method == m and t.history for t in data.trials)]
    if any(t.status != FINISHED and t.history for t in data.trials):
        handles.append(Line2D([], [], color="gray", marker="x", linestyle=":", label="unfinished / errored"))
    if front:
        handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="--",
                              label="Pareto front"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_objective_history(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    trials = sorted(data.trials, key=lambda t: t.order)
    if not trials:
        return False
    colors = _colors(data.methods())
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    best_so_far, xs, ys = None, [], []
    labelled: set[str] = set()
    for n, t in enumerate(trials, start=1):
        row = t.best() if t.finished else None
        if row is not None:
            value = row["objective"]
            best_so_far = value if best_so_far is None else max(best_so_far, value)
            ax.scatter([n], [value], color=colors[t.method], s=30, zorder=3, alpha=0.8,
                       label=t.method if t.method not in labelled else None)
            labelled.add(t.method)
        elif t.status == ERRORED:
            ax.axvline(n, color="red", alpha=0.15, linewidth=4)
        if best_so_far is not None:
            xs.append(n)
            ys.append(best_so_far)
    if xs:
        ax.step(xs, ys, where="post", color="black", linewidth=1.8, label="best so far", zorder=4)
    ax.set_xlabel("trials started")
    ax.set_ylabel("objective (MU + FE) / 2")
    ax.set_title(f"{data.title}: best objective so far (red: errored trials)", fontsize=10)
    ax.set_xlim(0.5, len(trials) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if labelled or xs:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_steps(data: SweepData, path: Path) -> bool:
    import matplotlib.pyplot as plt

    best = {m: e for m, e in data.best_per_method().items() if e is not None}
    if not best:
        return False
    colors = _colors(data.methods())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120, sharex=True)
    for method, (t, _) in best.items():
        rows = [r for r in t.history if "step" in r]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("MU", "FE")):
            ax.plot(steps, [r.get(key, math.nan) for r in rows], "-o", color=colors[method], label=method,
                    markersize=4)
    for ax, key, name in zip(axes, ("MU", "FE"), ("model utility", "forget efficacy")):
        ax.set_xlabel("continual step (forget subtask)")
        ax.set_ylabel(f"{key} ({name})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data.title}: continual unlearning, best trial of each method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
