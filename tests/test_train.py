"""The unlearning worker on the session's small embedded model: every method, LoRA, DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raysweep.config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainingConfig
from raysweep.losses import METHODS
from raysweep.models import load_model
from raysweep.train import DivergenceError, accumulation_steps, run_unlearning, warmup_then_linear_decay

ROOT = Path(__file__).resolve().parents[1]


def experiment(specs, tmp_path=None, embedding_model=None, forget_quality=False, **training) -> ExperimentConfig:
    values = dict(lr=1e-3, epochs=1, effective_batch_size=4, per_device_batch_size=4)
    values.update(training)
    if tmp_path is not None:
        values.setdefault("output_dir", tmp_path / "out")
    return ExperimentConfig(
        name="test",
        model=ModelConfig(embedded=specs.model),
        data=DataConfig(synthetic=specs.synthetic, max_length=96),
        eval=EvalConfig(batch_size=32, max_length=64, embedding_model=embedding_model, nli_model=None,
                        forget_quality=forget_quality),
        training=TrainingConfig(**values),
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Capture:
    """A reporter that keeps every EpochReport."""

    def __init__(self):
        self.reports = []

    def __call__(self, report):
        self.reports.append(report)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_one_epoch_and_changes_weights(embedded, embedded_specs, method):
    base = load_model(str(embedded.target_dir))
    model = load_model(str(embedded.target_dir))
    before = weights(model)
    capture = Capture()
    result = run_unlearning(experiment(embedded_specs, method=method), capture, model=model)
    assert len(capture.reports) == 1 and len(result.history) == 1
    m = capture.reports[0].metrics
    assert m["epoch"] == 1
    for key in ("MU", "FE", "objective", "forget/R", "retain/P", "real_authors/TR", "world_facts/TE"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["eval/ES_dropped"] == 1.0 and "forget/ES" not in m  # no NLI model: recorded, not invented
    changed = [k for k, v in weights(model).items() if not torch.equal(v, before[k])]
    assert changed, f"{method} did not change any weight"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the copy was fresh


@pytest.mark.parametrize("method", ["ME+GD", "IDK+AP", "ME+KL"])  # ME+KL: reference = adapters off
def test_lora_trains_only_adapters(embedded, embedded_specs, method):
    capture = Capture()
    cfg = experiment(embedded_specs, method=method, lr=5e-3)
    cfg.training.lora.enabled = True
    cfg.training.lora.r = 4
    result = run_unlearning(cfg, capture)
    assert len(result.history) == 1
    samples = capture.reports[0].samples
    assert set(samples) == {"forget", "retain", "real_authors", "world_facts"}
    assert {"question", "ground_truth", "generation", "R", "P", "TR", "TE"} <= set(samples["forget"][0])
    assert not any(key.startswith("_") for key in samples["forget"][0])  # internal values stay internal


def test_lora_changes_only_adapter_weights(embedded, embedded_specs):
    model = load_model(str(embedded.target_dir))
    base_before = weights(model)
    cfg = experiment(embedded_specs, method="ME+GD", lr=5e-3)
    cfg.training.lora.enabled = True
    captured = {}

    def reporter(report):
        captured["metrics"] = report.metrics

    # run_unlearning wraps the model in place with peft: inspect the wrapped modules afterwards
    run_unlearning(cfg, reporter, model=model)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora, "no LoRA weights were added"
    base_after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    # base weights (renamed under base_layer) are untouched
    for name, tensor in base_before.items():
        matches = [v for k, v in base_after.items() if k.replace(".base_layer", "") == name]
        assert matches and torch.equal(matches[0], tensor), name


def test_effective_batch_is_kept_constant():
    assert accumulation_steps(32, 4, 1) == 8
    assert accumulation_steps(32, 4, 2) == 4
    assert accumulation_steps(8, 8, 1) == 1


def test_schedule_warms_up_then_decays_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_then_linear_decay(opt, warmup_steps=4, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] < lrs[5] and opt.param_groups[0]["lr"] == 0.0


def test_divergence_stops_the_run_with_a_clear_error(embedded, embedded_specs, monkeypatch):
    import raysweep.train as train

    real = train.compute_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), parts

    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(DivergenceError, match="loss became nan at epoch 1"):
        run_unlearning(experiment(embedded_specs, method="GA+GD"), Capture())


def test_ga_lowers_forget_probability_and_saves_checkpoint(embedded, embedded_specs, tmp_path):
    capture = Capture()
    cfg = experiment(embedded_specs, tmp_path, method="GA+GD", epochs=2, lr=2e-3, save_checkpoint="best",
                     forget_quality=True)
    result = run_unlearning(cfg, capture)
    first, last = (r.metrics for r in capture.reports)
    assert last["forget/P"] < first["forget/P"]
    assert 0.0 <= last["forget_quality"] <= 1.0
    assert result.checkpoint and (Path(result.checkpoint) / "config.json").is_file()
    reloaded = load_model(result.checkpoint)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def _yaml_for(specs, tmp_path: Path, **training) -> Path:
    cfg = experiment(specs, **training)
    doc = {"experiment": cfg.model_dump(mode="json"),
           "search": {"methods": [cfg.training.method]}}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_unlearn_cli_prints_one_json_line_per_epoch(embedded, embedded_specs, tmp_path):
    path = _yaml_for(embedded_specs, tmp_path, method="IDK+AP", epochs=2)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "raysweep.unlearn", "--config", str(path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(0 <= line["objective"] <= 1 for line in lines)
    assert "ES is not computed" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("offload, method", [("none", "ME+KL"), ("cpu", "NPO+GD")])
def test_deepspeed_zero3_on_cpu(embedded, embedded_specs, tmp_path, offload, method):
    """ZeRO-3 over gloo; with ``offload: cpu`` DeepSpeed's CPU Adam is JIT-built and used.

    KL's reference model must be a second partitioned load (a partitioned model cannot be
    deep-copied), and Forget Quality's retain model, loaded during evaluation, must not be
    partitioned (found by bench/gpu_check.py: both used to fail at their first forward)."""
    pytest.importorskip("deepspeed")
    path = _yaml_for(embedded_specs, tmp_path, method=method, epochs=1)
    doc = yaml.safe_load(path.read_text())
    doc["experiment"]["eval"]["forget_quality"] = True
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "raysweep.unlearn", "--config", str(path),
         "--set", f"experiment.training.deepspeed={{zero_stage: 3, offload_optimizer: {offload}, gradient_checkpointing: true}}"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-5000:])
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["epoch"] for line in lines] == [1]
    assert 0 <= lines[0]["objective"] <= 1
    assert lines[0]["train/zero_stage"] == 3  # the DeepSpeed engine really ran ZeRO-3
    assert 0 <= lines[0]["forget_quality"] <= 1


def test_precision_plan_keeps_fp32_weights_for_plain_gpu_full_finetuning():
    from raysweep.train import precision_plan

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert precision_plan("auto", cpu, use_ds=False, lora=False) == ("float32", None)
    assert precision_plan("auto", cpu, use_ds=True, lora=False) == ("float32", None)
    # AdamW on bf16 weights would round lr-1e-5 updates away: fp32 weights, bf16 autocast
    assert precision_plan("auto", gpu, use_ds=False, lora=False) == ("float32", torch.bfloat16)
    assert precision_plan("auto", gpu, use_ds=True, lora=False) == ("bfloat16", None)  # fp32 master in DS
    assert precision_plan("auto", gpu, use_ds=False, lora=True) == ("bfloat16", None)  # frozen base
    assert precision_plan("float16", gpu, use_ds=False, lora=False) == ("float16", None)  # explicit wins
    # the reason, measured: a 1e-5 step on a bf16 weight of 0.05 is lost, kept in fp32
    w = torch.tensor(0.05)
    assert (w.bfloat16() - 1e-5).item() == w.bfloat16().item()
    assert (w - 1e-5).item() != w.item()
