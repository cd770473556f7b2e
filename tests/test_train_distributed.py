"""Two data-parallel ranks (gloo, CPU): gradients are averaged, weights stay in sync, and
evaluation gives every rank the same metrics (each rank must report, as Ray Train requires)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_train import experiment


def _rank_main(rank: int, world: int, specs, cache: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), RAYSWEEP_CACHE=cache)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raysweep.train import run_unlearning

    reports = []
    cfg = experiment(specs, method="NPO+GD", epochs=1, effective_batch_size=4, per_device_batch_size=2)
    result = run_unlearning(cfg, reports.append)
    checksum = sum(float(p.detach().double().sum()) for p in result.model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": reports[-1].metrics, "checksum": checksum}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_stay_in_sync(embedded, embedded_specs, raysweep_cache, tmp_path):
    mp.spawn(_rank_main, args=(2, embedded_specs, raysweep_cache, str(tmp_path), 29533), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=0, abs=1e-9)  # identical weights
    for key in ("MU", "FE", "objective", "forget/R"):
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key])
    assert 0 <= r0["metrics"]["objective"] <= 1
