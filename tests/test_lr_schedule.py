"""The lr schedule is sized to the optimizer steps that really happen: plain torch, DDP over
gloo and DeepSpeed ZeRO-3 over gloo, under both protocols.

Every run checks, from the run's own metrics: the count of optimizer steps (DeepSpeed: its
engine's ``global_steps``) equals the planned count computed here by hand, the lr the last
optimizer step applied is the schedule's value at that step, and the lr after it is the
schedule's end value, 0.  (Before the fix, ZeRO-3 stepped only at DeepSpeed's own accumulation
boundaries: 5 of the 6 planned steps below, and the lr ended at 1/3 of its peak.)
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysweep.train import plan_steps, seed_linear_schedule, warmup_then_linear_decay
from test_train import experiment

LR = 1e-3
EPOCHS = 2
TASKS = [1, 2, 3, 4, 5]  # 20 forget questions of the session's small embedded set


def _stub_evaluator(model, tokenizer):
    return {"MU": 0.5, "FE": 0.5}, {}


def expected(protocol: str, n: int, per_device: int, accumulation: int, world: int) -> dict:
    """Planned steps, warm-up and the lr of the last step, written from the definitions."""
    batches = math.ceil(math.ceil(n / world) / per_device)  # this rank's loader length
    if protocol == "seed":  # forget.py:118-125
        total = int(EPOCHS * n) // (per_device * accumulation * world)
        per_epoch = n // (per_device * accumulation * world)
        warmup = per_epoch if per_epoch > 1 else 0
        last = total - 1
        factor = last / warmup if last < warmup else (total - last) / (total - warmup)
    else:
        total = EPOCHS * math.ceil(batches / accumulation)
        warmup = round(total / EPOCHS)  # warmup_epochs = 1
        last = total - 1
        factor = (last + 1) / warmup if last < warmup else (total - last) / (total - warmup)
    return {"total": total, "warmup": warmup, "lr_last_step": LR * factor}


def run_both(specs, per_device: int, effective: int, deepspeed: bool = False) -> dict:
    from raysweep.config import DeepSpeedConfig
    from raysweep.train import run_unlearning

    out = {}
    for protocol in ("raysweep", "seed"):
        reports = []
        cfg = experiment(specs, method="GA+GD", lr=LR, epochs=EPOCHS, effective_batch_size=effective,
                         per_device_batch_size=per_device)
        cfg.protocol = protocol
        cfg.data.task_ids = TASKS
        if deepspeed:
            cfg.training.deepspeed = DeepSpeedConfig(zero_stage=3, offload_optimizer="none",
                                                     gradient_checkpointing=False)
        run_unlearning(cfg, reports.append, evaluator=_stub_evaluator)
        out[protocol] = reports[-1].metrics
    return out


def check(metrics_by_protocol: dict, per_device: int, accumulation: int, world: int, n: int = 20) -> None:
    for protocol, m in metrics_by_protocol.items():
        want = expected(protocol, n, per_device, accumulation, world)
        assert m["train/planned_steps"] == want["total"], protocol
        assert m["train/optimizer_steps"] == want["total"], protocol
        assert m["train/lr_last_step"] == pytest.approx(want["lr_last_step"], rel=1e-9), protocol
        assert m["train/lr"] == 0.0, protocol  # the schedule's end value


def test_plans_by_hand():
    # forget01 on 2 GPUs (issue #14): 40 questions, batch 4, accumulation 4 -> 5 batches a rank
    raysweep = plan_steps("raysweep", 40, 5, 4, 4, 2, 5)
    assert (raysweep.total_steps, raysweep.warmup_steps) == (10, 2)
    seed = plan_steps("seed", 40, 5, 4, 4, 2, 5)
    assert (seed.total_steps, seed.warmup_steps) == (6, 0)  # floor(5*40/32) = 6; 40//32 = 1 -> 0
    assert plan_steps("seed", 400, 50, 4, 4, 2, 5).warmup_steps == 12
    for plan in (raysweep, seed):
        steps = sum(plan.boundary(e, i) for e in range(1, 6) for i in range(5) if plan.runs(e, i))
        assert steps == plan.total_steps
    # the seed's plan stops feeding micro-batches after its last step: 6 x 4 = 24 of 25
    assert sum(seed.runs(e, i) for e in range(1, 6) for i in range(5)) == 24
    with pytest.raises(ValueError, match="0 optimizer steps"):
        plan_steps("seed", 10, 3, 4, 4, 1, 1)


@pytest.mark.parametrize("make, warmup, total, first, last", [
    (warmup_then_linear_decay, 3, 8, 1 / 3, 1 / 5),
    (seed_linear_schedule, 3, 8, 0.0, 1 / 5),  # HF's linear schedule: step 0 has lr 0
    (seed_linear_schedule, 0, 6, 1.0, 1 / 6),
])
def test_schedules_end_at_zero(make, warmup, total, first, last):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(first) and lrs[-1] == pytest.approx(last)
    assert opt.param_groups[0]["lr"] == 0.0


def test_plain_run(embedded, embedded_specs):
    # 20 questions, batch 2, accumulation 3: 10 batches an epoch, the last step of each partial
    check(run_both(embedded_specs, per_device=2, effective=6), per_device=2, accumulation=3, world=1)


# ----------------------------------------------------------------------------- two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, specs, cache: str, out: str, port: int, deepspeed: bool) -> None:
    if deepspeed:
        os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), RAYSWEEP_CACHE=cache)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metrics = run_both(specs, per_device=2, effective=8, deepspeed=deepspeed)
    Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    dist.destroy_process_group()


def _spawn(specs, cache: str, out: Path, deepspeed: bool) -> list[dict]:
    ctx = mp.spawn(_rank, args=(2, specs, cache, str(out), _free_port(), deepspeed), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=10):  # True once both exited; raises when one failed
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 300 s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp-gloo", "zero3-gloo"])
def test_two_rank_runs(embedded, embedded_specs, raysweep_cache, tmp_path, deepspeed):
    if deepspeed:
        pytest.importorskip("deepspeed")
    # 10 questions a rank, batch 2, accumulation 2: 5 batches an epoch (odd: the last step of
    # each epoch is partial; DeepSpeed left alone would step 5 times instead of 6)
    for metrics in _spawn(embedded_specs, raysweep_cache, tmp_path, deepspeed):
        check(metrics, per_device=2, accumulation=2, world=2)
        if deepspeed:
            assert metrics["raysweep"]["train/zero_stage"] == 3
