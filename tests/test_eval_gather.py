"""Evaluation on gathered ZeRO-3 weights (raysweep.eval.gather): two gloo ranks on the CPU.

One spawn evaluates the same ZeRO-3 engine three ways: gathered (``eval.gather: always``), hooked
and synced (``never``), and ``auto`` under a forced memory limit (``RAYSWEEP_EVAL_FREE_BYTES``),
which must fall back to the synced path and say so. The gathered path must give the synced
path's metrics and generations, run generation without ``synced_gpus``, and leave the engine
partitioned and hooked afterwards (the synced evaluation after it runs on the hooks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import free_port
from test_train import experiment
from test_train_distributed import _join, spawn_ranks


def _gather_rank(rank: int, world: int, specs, cache: str, out: str, port: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    _join(rank, world, cache, port)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from raysweep.config import DeepSpeedConfig
    from raysweep.eval import evaluate as evaluate_module
    from raysweep.eval.gather import FREE_BYTES_ENV
    from raysweep.models import load_model, load_tokenizer
    from raysweep.scenarios import load_run_data, resolve
    from raysweep.train import _zero3_init, deepspeed_config

    cfg = experiment(specs, per_device_batch_size=2, effective_batch_size=4)
    cfg.training.deepspeed = DeepSpeedConfig(zero_stage=3, offload_optimizer="none", gradient_checkpointing=False)
    cfg.eval.max_samples = cfg.eval.max_forget_samples = 3  # uneven shares: rank 1 pads on the synced path
    resolved = resolve(cfg)
    data = load_run_data(cfg, resolved)
    ds_config = deepspeed_config(cfg, grad_accum=1, use_gpu=False)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    with _zero3_init(ds_config):
        model = load_model(resolved.model, dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    tokenizer = load_tokenizer(resolved.model)

    synced_calls: list[bool] = []
    original = evaluate_module.generate_batched

    def recording(*args, **kwargs):  # the synced flag and the live ZeRO-3 hooks at each generation
        synced_calls.append((kwargs["synced_gpus"], len(engine.optimizer.parameter_offload.forward_hooks) > 0))
        return original(*args, **kwargs)

    evaluate_module.generate_batched = recording
    logs: list[str] = []
    evaluator = evaluate_module.Evaluator(cfg, data.eval_sets, data_dir=resolved.data_dir, synced_gpus=True,
                                          engine=engine, log=logs.append)
    results = {}
    del logs[:]  # the set-up's own warnings (no CS, no ES models in the test config)
    for mode, free in (("always", None), ("never", None), ("auto", "1000")):
        if free is not None:
            os.environ[FREE_BYTES_ENV] = free
        evaluator.ev.gather = mode
        synced_calls.clear()
        with torch.no_grad():
            metrics, samples = evaluator(engine.module, tokenizer)
        partitioned = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in engine.module.parameters())
        hooks = len(engine.optimizer.parameter_offload.forward_hooks)
        results[mode] = {"metrics": metrics, "samples": samples, "synced": sorted(set(synced_calls)),
                         "partitioned_after": partitioned, "hooks_after": hooks}
    os.environ.pop(FREE_BYTES_ENV, None)
    results["logs"] = logs
    Path(out, f"gather{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gathered_evaluation_matches_the_synced_path_and_falls_back_when_memory_is_short(
        embedded, embedded_specs, raysweep_cache, tmp_path):
    pytest.importorskip("deepspeed")
    spawn_ranks(_gather_rank, (2, embedded_specs, raysweep_cache, str(tmp_path), free_port()))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"gather{rank}.json").read_text())
        gathered, synced, fallback = got["always"], got["never"], got["auto"]
        # the gathered path generates without synced_gpus and without hooks; the other two with both
        assert gathered["synced"] == [[False, False]]
        assert synced["synced"] == [[True, True]] and fallback["synced"] == [[True, True]]
        assert gathered["metrics"]["eval/gathered"] == 1.0
        assert synced["metrics"]["eval/gathered"] == 0.0 and fallback["metrics"]["eval/gathered"] == 0.0
        assert [got[m]["metrics"]["eval/gather_fallback"] for m in ("always", "never", "auto")] == [0.0, 0.0, 1.0]
        # the same numbers and the same answers, every set, every question
        assert set(gathered["metrics"]) == set(synced["metrics"])
        for key, value in synced["metrics"].items():
            if key.startswith("eval/gather"):
                continue
            assert gathered["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            assert fallback["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, rows in synced["samples"].items():
            assert [r["generation"] for r in gathered["samples"][name]] == [r["generation"] for r in rows], name
            assert [r["question"] for r in gathered["samples"][name]] == [r["question"] for r in rows], name
        # the weights are partitioned again after each evaluation (released, hooks back)
        assert all(got[mode]["partitioned_after"] for mode in ("always", "never", "auto"))
        assert got["always"]["hooks_after"] == got["never"]["hooks_after"] > 0
        # said once each: the gathered path, the hooked one, then the fallback with its figures
        said = got["logs"]
        assert len(said) == 3, said
        assert said[0].startswith("evaluation: on gathered ZeRO-3 weights") and "always" in said[0]
        assert said[1].startswith("evaluation: on the hooked ZeRO-3 path") and "never" in said[1]
        assert said[2].startswith("warning: evaluation falls back to the hooked ZeRO-3 path") and "GiB" in said[2]
