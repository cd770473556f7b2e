"""Peak memory of a whole sweep: the driver and every Ray process it starts, at concurrency 1 and 2.

    python bench/memory.py [--space search_spaces/tiny.yaml] [--concurrency 1 2] [--trials 4]
                           [--epochs 2]

Runs ``python -m raysweep.tune`` (a local Ray instance: GCS, raylet, dashboard, Tune driver,
trial drivers, Train controllers and workers are all descendants of the command) once per
concurrency level, with ``--trials`` trials of ``--epochs`` epochs and no scheduler, and polls
the process tree twice a second. It reports the peak of the summed RSS (counts pages shared
between processes — torch's libraries, Ray's object store — once per process, so it
overstates) and of the summed PSS (shared pages split between their users: the machine's real
cost), and the process count at the peak.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, processes) of ``root`` and its descendants."""
    rss = pss = count = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return rss, pss, count


def measure(space: str, concurrency: int, trials: int, epochs: int, work: Path) -> dict:
    name = f"mem-c{concurrency}"
    cmd = [sys.executable, "-m", "raysweep.tune", "--space", space, "--storage", str(work / "results"),
           "--name", name, "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--num-samples", str(trials), "--max-concurrent", str(concurrency),
           "--set", "search.scheduler.type=none", "--set", f"search.space.epochs={epochs}",
           "--set", "search.overrides={}"]
    log = open(work / f"{name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "pss": 0, "processes_at_pss_peak": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            rss, pss, count = tree_memory(root)
            peak["rss"] = max(peak["rss"], rss)
            if pss > peak["pss"]:
                peak["pss"], peak["processes_at_pss_peak"] = pss, count
            time.sleep(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    code = proc.wait()
    done.set()
    thread.join()
    log.close()
    if code != 0:
        sys.exit(f"sweep failed ({code}); see {work / (name + '.log')}")
    return {"concurrency": concurrency, "trials": trials, "epochs": epochs,
            "wall_s": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak["rss"] / GIB, 2),
            "peak_pss_gib": round(peak["pss"] / GIB, 2), "processes": peak["processes_at_pss_peak"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "tiny.yaml"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    space = str(Path(args.space).resolve())
    with tempfile.TemporaryDirectory(prefix="raysweep-mem-") as tmp:
        work = Path(tmp)
        from raysweep.config import load_config
        from raysweep.scenarios import ensure_embedded_for

        ensure_embedded_for(load_config(space).experiment)  # before measuring: no sweep builds it
        results = [measure(space, c, args.trials, args.epochs, work) for c in args.concurrency]
    print("| concurrent trials | trials x epochs | wall time | peak RSS (sum) | peak PSS (sum) | processes at peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['concurrency']} | {r['trials']} x {r['epochs']} | {r['wall_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB | "
              f"{r['peak_pss_gib']:.2f} GiB | {r['processes']} |")


if __name__ == "__main__":
    main()
