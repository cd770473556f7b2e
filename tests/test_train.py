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

from conftest import free_port
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


def forget_truth_ratios(cfg: ExperimentConfig, model_dir: str) -> list[float]:
    """Per-question truth ratios of the model in ``model_dir`` on ``cfg``'s forget set, computed
    here from the answer likelihoods: exp(avg NLL(paraphrased) - mean avg NLL(perturbed))."""
    import math

    from raysweep.data.formatting import encode_qa
    from raysweep.eval.likelihood import answer_nlls
    from raysweep.models import load_tokenizer
    from raysweep.scenarios import load_run_data, resolve

    data = load_run_data(cfg, resolve(cfg))
    forget = next(s for s in data.eval_sets.values() if s.is_forget)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    template, max_length = cfg.model.prompt_template, cfg.data.max_length
    ratios = []
    for r in forget.records:
        examples = [encode_qa(tokenizer, r.question, a, template, max_length)
                    for a in (r.paraphrased_answer, *r.perturbed_answer)]
        with torch.no_grad():
            nlls = answer_nlls(model, examples, 8, tokenizer.pad_token_id or 0)
        para, pert = nlls[0].avg_nll, [n.avg_nll for n in nlls[1:]]
        ratios.append(math.exp(para - sum(pert) / len(pert)))
    return ratios


def expected_forget_quality(unlearned_ratios, retain_ratios) -> float:
    """Forget Quality by definition: the KS two-sample test's p-value (TOFU)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(unlearned_ratios, retain_ratios).pvalue)


# -m "not slow" runs three (plain, reference model, IDK templates); the default suite runs all 11
QUICK_METHODS = ("GA+GD", "NPO+KL", "IDK+AP")


@pytest.mark.parametrize("method", [m if m in QUICK_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
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


def _split_lora(model: torch.nn.Module) -> tuple[dict, dict]:
    """(adapter weights, base weights under their original names) of a peft-wrapped model."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora = {k: v for k, v in state.items() if "lora_" in k}
    base = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
            for k, v in state.items() if "lora_" not in k}
    return lora, base


@pytest.mark.parametrize("method", [pytest.param("ME+GD", marks=pytest.mark.slow),
                                    pytest.param("IDK+AP", marks=pytest.mark.slow),
                                    "ME+KL"])  # ME+KL: reference = adapters off
def test_lora_trains_only_adapters(embedded, embedded_specs, method):
    capture = Capture()
    cfg = experiment(embedded_specs, method=method, lr=5e-3)
    cfg.training.lora.enabled = True
    cfg.training.lora.r = 4
    model = load_model(str(embedded.target_dir))
    before = weights(model)
    result = run_unlearning(cfg, capture, model=model)
    assert len(result.history) == 1
    lora, base = _split_lora(result.model)
    # peft starts every lora_B at zero: a non-zero lora_B is an adapter that moved
    moved = [k for k, v in lora.items() if "lora_B" in k and v.abs().max() > 0]
    assert moved and len(moved) == sum("lora_B" in k for k in lora), "some adapters did not train"
    assert set(base) == set(before)
    changed = [k for k, v in before.items() if not torch.equal(base[k], v)]
    assert changed == [], f"{method} changed base weights: {changed[:5]}"
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
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
    torch.manual_seed(0)
    result = run_unlearning(cfg, reporter, model=model)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora, "no LoRA weights were added"
    # the adapters moved: every lora_B (zero at peft's init) is non-zero, and lora_A differs
    # from a fresh wrap of the same base under the same seed
    assert all(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "adapters did not train"
    from raysweep.models import apply_lora

    torch.manual_seed(0)
    fresh = apply_lora(load_model(str(embedded.target_dir)), r=cfg.training.lora.r, alpha=cfg.training.lora.alpha,
                       dropout=cfg.training.lora.dropout, target_modules=cfg.training.lora.target_modules)
    fresh_lora = {k.replace("base_model.model.", "", 1): v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert set(fresh_lora) == set(lora)
    assert any(not torch.equal(v, fresh_lora[k]) for k, v in lora.items() if "lora_A" in k)
    base_after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    # base weights (renamed under base_layer) are untouched
    for name, tensor in base_before.items():
        matches = [v for k, v in base_after.items() if k.replace(".base_layer", "") == name]
        assert matches and torch.equal(matches[0], tensor), name
    assert result.model is not None


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


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_divergence_stops_the_run_with_a_clear_error(embedded, embedded_specs, monkeypatch, bad):
    import raysweep.train as train

    real = train.compute_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * 0 + float(bad), parts  # keeps the graph, the value is nan / inf

    monkeypatch.setattr(train, "compute_loss", poisoned)
    capture = Capture()
    with pytest.raises(DivergenceError, match=f"loss became {bad} at epoch 1, batch 0"):
        run_unlearning(experiment(embedded_specs, method="GA+GD"), capture)
    assert capture.reports == []  # nothing was reported from a diverged epoch


def test_auto_batch_on_cpu_is_planned_printed_and_reported(embedded, embedded_specs, capsys):
    """per_device_batch_size: auto without a GPU: the per-rank batch (here 8, one micro-step a
    step); the plan is printed once and its values reach every epoch report (and so MLflow)."""
    capture = Capture()
    cfg = experiment(embedded_specs, method="GA+GD", epochs=2, effective_batch_size=8, per_device_batch_size="auto")
    run_unlearning(cfg, capture, evaluator=lambda model, tokenizer: ({"objective": 0.5}, {}))
    assert capsys.readouterr().err.count("raysweep: memory plan (CPU run") == 1
    for report in capture.reports:
        assert report.metrics["plan/per_device_batch_size"] == 8 and report.metrics["train/gradient_accumulation"] == 1
        assert report.metrics["plan/zero_stage"] == -1  # no DeepSpeed
    assert cfg.training.per_device_batch_size == "auto"  # the caller's config is not changed


def test_divergence_is_checked_once_per_optimizer_step_not_per_micro_step(embedded, embedded_specs, monkeypatch):
    """Accumulation 4: a NaN at micro-step 1 is found at the optimizer step after micro-step 3
    (no host synchronisation in between), named by its own batch, before any step is applied."""
    import raysweep.train as train

    real, calls = train.compute_loss, []

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        assert all(isinstance(v, torch.Tensor) for v in parts.values())  # nothing converted to a float
        calls.append(len(calls))
        return (loss * 0 + float("nan"), parts) if len(calls) == 2 else (loss, parts)

    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    monkeypatch.setattr(train, "compute_loss", poisoned)
    cfg = experiment(embedded_specs, method="GA+GD", effective_batch_size=4, per_device_batch_size=1)
    with pytest.raises(DivergenceError, match="loss became nan at epoch 1, batch 1 "):
        run_unlearning(cfg, Capture())
    assert len(calls) == 4 and steps == []  # checked at the boundary, before the optimizer stepped


@pytest.mark.slow
def test_ga_lowers_forget_probability_and_saves_checkpoint(embedded, embedded_specs, tmp_path):
    capture = Capture()
    cfg = experiment(embedded_specs, tmp_path, method="GA+GD", epochs=2, lr=2e-3, save_checkpoint="best",
                     forget_quality=True)
    result = run_unlearning(cfg, capture)
    first, last = (r.metrics for r in capture.reports)
    assert last["forget/P"] < first["forget/P"]
    # Forget Quality = KS p-value of the unlearned model's forget-set truth ratios (the epoch's
    # per-question TR) against the retain model's, computed here from the retain model itself
    unlearned = [row["TR"] for row in capture.reports[-1].samples["forget"]]
    retain = forget_truth_ratios(cfg, str(embedded.retain_dir))
    assert len(unlearned) == len(retain)
    assert last["forget_quality"] == pytest.approx(expected_forget_quality(unlearned, retain), rel=1e-9)
    assert result.checkpoint and (Path(result.checkpoint) / "config.json").is_file()
    best_epoch = max(capture.reports, key=lambda r: r.metrics["objective"]).epoch
    assert result.checkpoint == capture.reports[best_epoch - 1].checkpoint


class ScriptedEvaluator:
    """Objective by epoch from a script (no generation: fast); snapshots the weights it sees."""

    def __init__(self, objectives: list[float]):
        self.objectives = objectives
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, tokenizer):
        self.snapshots.append(weights(model))
        value = self.objectives[len(self.snapshots) - 1]
        return {"MU": value, "FE": value, "objective": value}, {}


@pytest.mark.parametrize("mode, objectives, epoch_saved", [
    ("best", [0.2, 0.7, 0.4], 2),  # the best epoch is not the last: a later save would overwrite it
    ("best", [0.5, 0.5, 0.3], 1),  # a tie is not an improvement: the first of equals is kept
    ("final", [0.9, 0.1, 0.2], 3),
])
def test_checkpoint_holds_the_weights_of_the_epoch_it_names(embedded, embedded_specs, tmp_path, mode, objectives,
                                                            epoch_saved):
    cfg = experiment(embedded_specs, tmp_path, method="GA+GD", epochs=3, lr=2e-3, save_checkpoint=mode)
    evaluator = ScriptedEvaluator(objectives)
    capture = Capture()
    result = run_unlearning(cfg, capture, evaluator=evaluator)
    snapshots = evaluator.snapshots
    assert len(snapshots) == 3
    assert any(not torch.equal(v, snapshots[2][k]) for k, v in snapshots[0].items())  # the epochs differ
    assert result.checkpoint == str(tmp_path / "out" / mode)
    saved = weights(load_model(result.checkpoint))
    expected = snapshots[epoch_saved - 1]
    assert set(saved) <= set(expected)
    mismatched = [k for k, v in saved.items() if not torch.equal(v, expected[k])]
    assert mismatched == [], f"{mode} checkpoint is not epoch {epoch_saved}'s weights: {mismatched[:5]}"
    others = [e for e in (1, 2, 3) if e != epoch_saved]
    for other in others:
        assert any(not torch.equal(v, snapshots[other - 1][k]) for k, v in saved.items()), other
    improved = [o > max(objectives[:i], default=float("-inf")) for i, o in enumerate(objectives)]
    assert [r.checkpoint is not None for r in capture.reports] == (improved if mode == "best" else [False, False, True])


def _yaml_for(specs, tmp_path: Path, **training) -> Path:
    cfg = experiment(specs, **training)
    doc = {"experiment": cfg.model_dump(mode="json"),
           "search": {"methods": [cfg.training.method]}}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
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
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("offload, method", [("auto", "ME+KL"), ("cpu", "NPO+GD")])
def test_deepspeed_zero3_on_cpu(embedded, embedded_specs, tmp_path, offload, method):
    """ZeRO-3 over gloo; with ``offload: cpu`` DeepSpeed's CPU Adam is JIT-built and used; with
    every setting ``auto`` the CPU plan (ZeRO-3, no offload, no checkpointing) is what runs.

    KL's reference model must be a second partitioned load (a partitioned model cannot be
    deep-copied), and Forget Quality's retain model, loaded during evaluation, must not be
    partitioned (found by bench/gpu_check.py: both used to fail at their first forward)."""
    pytest.importorskip("deepspeed")
    path = _yaml_for(embedded_specs, tmp_path, method=method, epochs=1)
    doc = yaml.safe_load(path.read_text())
    doc["experiment"]["eval"]["forget_quality"] = True
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    ds = ("{zero_stage: auto, offload_optimizer: auto, gradient_checkpointing: auto}" if offload == "auto" else
          f"{{zero_stage: 3, offload_optimizer: {offload}, gradient_checkpointing: true}}")
    proc = subprocess.run(
        [sys.executable, "-m", "raysweep.unlearn", "--config", str(path), "--set", f"experiment.training.deepspeed={ds}"]
        + (["--set", "experiment.training.per_device_batch_size=auto"] if offload == "auto" else []),
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-5000:])
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["epoch"] for line in lines] == [1]
    assert 0 <= lines[0]["objective"] <= 1
    assert lines[0]["train/zero_stage"] == 3  # the DeepSpeed engine really ran ZeRO-3
    assert 0 <= lines[0]["forget_quality"] <= 1
    assert lines[0]["plan/gradient_checkpointing"] == (0 if offload == "auto" else 1)
    assert lines[0]["plan/offload_optimizer"] == (1 if offload == "cpu" else 0)
    assert proc.stderr.count("raysweep: memory plan") == 1
    if offload == "auto":
        assert "memory plan (CPU run" in proc.stderr


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
