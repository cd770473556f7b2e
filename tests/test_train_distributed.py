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

from conftest import free_port
from test_train import experiment

RANKS_TIMEOUT = 480  # seconds for all ranks together: a gloo / ZeRO-3 deadlock fails, never hangs


def spawn_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = RANKS_TIMEOUT) -> None:
    """``mp.spawn(fn, args, nprocs)`` with a join timeout: ranks still running after ``timeout``
    seconds are killed and the test fails (a rank's exception is re-raised as mp.spawn does)."""
    import time

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(10)
            pytest.fail(f"{nprocs} ranks of {fn.__name__} did not finish within {timeout:.0f} s (deadlock?)")


def _join(rank: int, world: int, cache: str, port: int) -> None:
    """Become rank ``rank`` of a gloo group on this machine, one thread, the session's cache."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), RAYSWEEP_CACHE=cache)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rank_main(rank: int, world: int, specs, cache: str, out: str, port: int) -> None:
    _join(rank, world, cache, port)
    from raysweep.train import run_unlearning

    reports = []
    cfg = experiment(specs, method="NPO+GD", epochs=1, effective_batch_size=4, per_device_batch_size=2)
    result = run_unlearning(cfg, reports.append)
    checksum = sum(float(p.detach().double().sum()) for p in result.model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": reports[-1].metrics, "checksum": checksum}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_stay_in_sync(embedded, embedded_specs, raysweep_cache, tmp_path):
    spawn_ranks(_rank_main, (2, embedded_specs, raysweep_cache, str(tmp_path), free_port()))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=0, abs=1e-9)  # identical weights
    for key in ("MU", "FE", "objective", "forget/R"):
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key])
    assert 0 <= r0["metrics"]["objective"] <= 1


def _evaluate_target(specs, model_dir: str | None = None, **training) -> tuple[dict, dict]:
    """The full evaluation of the embedded target (or of the model in ``model_dir``) on 3
    questions per set: not a multiple of the world size, so the second rank's share is padded."""
    from raysweep.eval.evaluate import Evaluator
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import load_run_data, resolve

    cfg = experiment(specs, forget_quality=True, **training)
    cfg.eval.max_samples = cfg.eval.max_forget_samples = 3
    resolved = resolve(cfg)
    data = load_run_data(cfg, resolved)
    evaluator = Evaluator(cfg, data.eval_sets, retain_model=resolved.retain_model, data_dir=resolved.data_dir,
                          log=lambda msg: None)
    path = model_dir or resolved.model
    return evaluator(load_model(path, dtype="float32"), load_tokenizer(path))


def _eval_rank(rank: int, world: int, specs, cache: str, out: str, port: int) -> None:
    _join(rank, world, cache, port)
    from raysweep.eval import evaluate as evaluate_module

    calls = []
    original = evaluate_module.Evaluator._question_values

    def counting(self, model, tokenizer, eval_set, records):
        calls.append(len(records))
        return original(self, model, tokenizer, eval_set, records)

    evaluate_module.Evaluator._question_values = counting
    metrics, samples = _evaluate_target(specs)
    Path(out, f"eval{rank}.json").write_text(json.dumps({"metrics": metrics, "samples": samples, "calls": calls}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_is_sharded_across_ranks_and_matches_one_process(embedded, embedded_specs, raysweep_cache, tmp_path):
    torch.set_num_threads(1)
    whole_metrics, whole_samples = _evaluate_target(embedded_specs)
    spawn_ranks(_eval_rank, (2, embedded_specs, raysweep_cache, str(tmp_path), free_port()))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"eval{rank}.json").read_text())
        # each rank generated and scored only its share: 2 of 3 questions per set (1 + 1 padding on rank 1)
        assert {name: len(rows) for name, rows in whole_samples.items()} == dict.fromkeys(whole_samples, 3)
        assert got["calls"] == [2] * len(whole_samples)
        assert set(got["metrics"]) == set(whole_metrics)
        for key, value in whole_metrics.items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, rows in whole_samples.items():
            assert [r["question"] for r in got["samples"][name]] == [r["question"] for r in rows]
            assert [r["generation"] for r in got["samples"][name]] == [r["generation"] for r in rows]


def _zero3_rank(rank: int, world: int, specs, cache: str, out: str, port: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    _join(rank, world, cache, port)
    from raysweep.config import DeepSpeedConfig
    from raysweep.train import run_unlearning

    reports = []
    cfg = experiment(specs, method="ME+KL", epochs=1, effective_batch_size=4, per_device_batch_size=2,
                     forget_quality=True, save_checkpoint="final", output_dir=Path(out) / "trained")
    cfg.training.deepspeed = DeepSpeedConfig(zero_stage=3, offload_optimizer="none", gradient_checkpointing=True)
    cfg.eval.max_samples = cfg.eval.max_forget_samples = 3  # uneven shares: rank 1 pads
    run_unlearning(cfg, reports.append)  # the final weights, gathered from both ranks' partitions
    Path(out, f"zero3_{rank}.json").write_text(json.dumps(reports[-1].metrics))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_zero3_ranks_generate_in_step_and_agree(embedded, embedded_specs, raysweep_cache, tmp_path):
    """ZeRO-3 over 2 gloo ranks: sharded evaluation with synced generation (every rank in every
    generate/forward call, equal padded shares) finishes, both ranks report the same metrics, and
    those are the metrics a single process without DeepSpeed gets from the same (saved) weights."""
    pytest.importorskip("deepspeed")
    spawn_ranks(_zero3_rank, (2, embedded_specs, raysweep_cache, str(tmp_path), free_port()))
    r0, r1 = (json.loads((tmp_path / f"zero3_{r}.json").read_text()) for r in (0, 1))
    assert r0["train/zero_stage"] == 3
    for key in ("MU", "FE", "objective", "forget/R", "retain/TR"):
        assert r0[key] == pytest.approx(r1[key], rel=1e-6), key
    torch.set_num_threads(1)
    single, _ = _evaluate_target(embedded_specs, str(tmp_path / "trained" / "final"))
    shared = [k for k in single if k in r0]
    assert {"MU", "FE", "objective", "forget/R", "forget/P", "retain/TR", "forget_quality"} <= set(shared)
    for key in shared:
        assert r0[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), (key, r0[key], single[key])
