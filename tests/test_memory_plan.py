"""The memory planner (``zero_stage: auto`` & co.): its accounting against docs/SCALING.md's
hand-computed figures, and its decisions on a table of 7B / 8B × 40 / 80 GB × 1 / 2 / 4 GPUs ×
GD / KL cases."""

from __future__ import annotations

import pytest

from raysweep.memory_plan import (
    GB, HEADROOM, ModelShape, PlanError, activation_bytes, estimate, plan_memory, state_bytes,
)

LLAMA2_7B = ModelShape(n_params=6_738_415_616, layers=32, hidden=4096, heads=32, vocab=32_000)
LLAMA3_8B = ModelShape(n_params=8_030_261_248, layers=32, hidden=4096, heads=32, vocab=128_256)
GiB = 2**30


def test_states_match_scaling_section_2_2():
    # docs/SCALING.md 2.1/2.2: 16 bytes/param; ZeRO-3 on 2 GPUs = 53.9 GB (7B), 64.2 GB (8B).
    assert state_bytes(LLAMA2_7B.n_params, 2, 3, False) / GB == pytest.approx(53.9, abs=0.05)
    assert state_bytes(LLAMA3_8B.n_params, 2, 3, False) / GB == pytest.approx(64.2, abs=0.05)
    assert state_bytes(LLAMA2_7B.n_params, 1, 3, False) / GB == pytest.approx(107.8, abs=0.05)
    # ZeRO-2: full bf16 weights (13.5 GB) + 14 bytes/param split over N.
    assert state_bytes(LLAMA2_7B.n_params, 2, 2, False) / GB == pytest.approx(13.48 + 47.17, abs=0.05)
    # Offload: only the bf16 weight and gradient partitions stay on the GPU.
    assert state_bytes(LLAMA2_7B.n_params, 2, 3, True) / GB == pytest.approx(13.5, abs=0.05)
    with pytest.raises(ValueError, match="zero stage 1"):
        state_bytes(1, 1, 1, False)


def test_activations_match_scaling_section_2_3():
    # B = 4, T = 500, one part: checkpointed inputs 524 MB + one recomputed layer 439 MB + logits 640 MB.
    ckpt = activation_bytes(LLAMA2_7B, batch=4, seq_len=500, parts=1, checkpointing=True)
    assert ckpt / 1e6 == pytest.approx(524 + 439 + 640, abs=2)
    # Without checkpointing every layer's activations stay: 32 x 439 MB (+ logits).
    full = activation_bytes(LLAMA2_7B, batch=4, seq_len=500, parts=1, checkpointing=False)
    assert full / 1e6 == pytest.approx(32 * 439 + 640, abs=20)
    # Parts add up (raysweep sums the parts' losses before one backward); Llama-3's logits: 2.6 GB.
    assert activation_bytes(LLAMA2_7B, batch=4, seq_len=500, parts=3, checkpointing=True) == pytest.approx(3 * ckpt)
    logits_8b = activation_bytes(LLAMA3_8B, batch=4, seq_len=500, parts=1, checkpointing=True) - (524e6 + 439e6)
    assert logits_8b / GB == pytest.approx(2.6, abs=0.05)


def test_kl_reference_is_partitioned_only_under_zero3():
    kw = dict(checkpointing=True, batch=4, seq_len=160, parts=2)
    ref3 = dict(estimate(LLAMA2_7B, world=2, stage=3, offload=False, needs_ref=True, **kw))["reference"]
    ref2 = dict(estimate(LLAMA2_7B, world=2, stage=2, offload=False, needs_ref=True, **kw))["reference"]
    none = dict(estimate(LLAMA2_7B, world=2, stage=3, offload=False, needs_ref=False, **kw))["reference"]
    assert ref3 / GB == pytest.approx(6.74, abs=0.01)  # SCALING 2.5: 6.7 GB per GPU on 2 GPUs
    assert ref2 / GB == pytest.approx(13.48, abs=0.01)
    assert none == 0


# (model, GPU GiB, GPUs, method) -> (ZeRO stage, offload, checkpointing, per-device batch).
# TOFU-like sequences (160 tokens), 2 parts a step, effective batch 32.  Reading the table:
# one 40 GB GPU never holds 16 bytes/param of a 7B, so only offload fits, and not with KL's
# full-size reference; 2 x 80 GB holds ZeRO-2 for 7B (13.5 + 47.2 GB + activations < 77.3 GB)
# until KL's 13.5 GB reference pushes it to ZeRO-3 (53.9 + 6.7); 8B with KL on 2 x 80 GB misses
# ZeRO-3 without offload by ~0.4 GB (64.2 + 8.0 + buffers); 4 x 80 GB holds ZeRO-2 throughout.
TABLE = [
    (LLAMA2_7B, 40, 1, "GD", (3, True, True, 16)),
    (LLAMA2_7B, 40, 1, "KL", None),
    (LLAMA2_7B, 40, 2, "GD", (3, True, True, 16)),
    (LLAMA2_7B, 40, 2, "KL", (3, True, True, 16)),
    (LLAMA2_7B, 40, 4, "GD", (3, False, True, 8)),
    (LLAMA2_7B, 40, 4, "KL", (3, False, True, 8)),
    (LLAMA2_7B, 80, 1, "GD", (3, True, True, 16)),
    (LLAMA2_7B, 80, 1, "KL", (3, True, True, 16)),
    (LLAMA2_7B, 80, 2, "GD", (2, False, False, 4)),
    (LLAMA2_7B, 80, 2, "KL", (3, False, False, 4)),
    (LLAMA2_7B, 80, 4, "GD", (2, False, False, 8)),
    (LLAMA2_7B, 80, 4, "KL", (2, False, False, 8)),
    (LLAMA3_8B, 40, 1, "GD", (3, True, True, 1)),
    (LLAMA3_8B, 40, 1, "KL", None),
    (LLAMA3_8B, 40, 2, "GD", (3, True, True, 16)),
    (LLAMA3_8B, 40, 2, "KL", (3, True, True, 16)),
    (LLAMA3_8B, 40, 4, "GD", (3, True, True, 8)),
    (LLAMA3_8B, 40, 4, "KL", (3, True, True, 8)),
    (LLAMA3_8B, 80, 1, "GD", (3, True, True, 16)),
    (LLAMA3_8B, 80, 1, "KL", (3, True, True, 16)),
    (LLAMA3_8B, 80, 2, "GD", (3, False, True, 8)),
    (LLAMA3_8B, 80, 2, "KL", (3, True, True, 16)),
    (LLAMA3_8B, 80, 4, "GD", (2, False, False, 8)),
    (LLAMA3_8B, 80, 4, "KL", (2, False, False, 4)),
]


@pytest.mark.parametrize("shape,gib,world,reg,expected", TABLE,
                         ids=[f"{'7B' if s is LLAMA2_7B else '8B'}-{g}GB-{w}gpu-{r}" for s, g, w, r, _ in TABLE])
def test_plan_table(shape, gib, world, reg, expected):
    kw = dict(gpu_bytes=gib * GiB, world=world, seq_len=160, parts=2, needs_ref=reg == "KL", effective_batch=32)
    if expected is None:
        with pytest.raises(PlanError, match=r"does not fit 1 GPU\(s\) of 43 GB.*num_workers"):
            plan_memory(shape, **kw)
        return
    plan = plan_memory(shape, **kw)
    assert (plan.zero_stage, plan.offload_optimizer, plan.gradient_checkpointing, plan.per_device_batch_size) == expected
    assert plan.per_device_batch_size * plan.gradient_accumulation * world == 32
    assert plan.estimate_bytes <= HEADROOM * gib * GiB
    assert plan.estimate_bytes == pytest.approx(sum(v for _, v in plan.components))
    assert "estimate" in plan.describe() and f"ZeRO-{expected[0]}" in plan.describe()


def test_fixed_values_are_kept():
    kw = dict(gpu_bytes=80 * GiB, world=2, seq_len=160, parts=2, needs_ref=False, effective_batch=32)
    plan = plan_memory(LLAMA2_7B, stage=3, checkpointing=True, **kw)
    assert (plan.zero_stage, plan.gradient_checkpointing, plan.offload_optimizer) == (3, True, False)
    assert plan_memory(LLAMA2_7B, batch=2, **kw).per_device_batch_size == 2
    with pytest.raises(PlanError, match="does not fit 2 GPU"):
        plan_memory(LLAMA2_7B, stage=2, batch=16, checkpointing=False, **kw)  # 16 x 160 x 32 layers, no recompute


def test_small_model_prefers_zero2_without_recompute():
    tiny = ModelShape(n_params=135_000_000, layers=30, hidden=576, heads=9, vocab=49_152)
    plan = plan_memory(tiny, gpu_bytes=139 * GiB, world=1, seq_len=256, parts=3, needs_ref=True, effective_batch=32)
    assert (plan.zero_stage, plan.offload_optimizer, plan.gradient_checkpointing, plan.per_device_batch_size) == (2, False, False, 16)
    assert plan.gradient_accumulation == 2


def test_shape_from_hf_config_counts_parameters_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    shape = ModelShape.from_hf_config(config)
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert shape == ModelShape(n_params=real, layers=3, hidden=64, heads=4, vocab=500)


# ----------------------------------------------------------------------------- config -> resolved run


def _llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    # Llama-2-7B's architecture (intermediate 11008, untied head): 6.74 B parameters
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=11008,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads, tie_word_embeddings=False)


def _experiment(deepspeed, batch="auto", method="GA+GD", **data):
    from raysweep.config import DataConfig, ExperimentConfig, TrainingConfig

    training = TrainingConfig(method=method, effective_batch_size=32, per_device_batch_size=batch, deepspeed=deepspeed)
    return ExperimentConfig(training=training, data=DataConfig(max_length=160, **data))


def _world(size: int, device: str = "cpu"):
    import torch

    from raysweep.train import World

    return World(rank=0, local_rank=0, size=size, device=torch.device(device))


AUTO = {"zero_stage": "auto", "offload_optimizer": "auto", "gradient_checkpointing": "auto"}


def test_yaml_keys_take_auto_and_reject_other_words(tmp_path):
    from raysweep.config import ConfigError, DeepSpeedConfig, load_config

    assert DeepSpeedConfig().model_dump() == {**AUTO, "offload_param": "none"}  # the default is the plan
    path = tmp_path / "s.yaml"
    path.write_text("experiment:\n  training:\n    per_device_batch_size: auto\n"
                    "    deepspeed: {zero_stage: auto, offload_optimizer: auto, gradient_checkpointing: auto}\n")
    cfg = load_config(path)
    assert cfg.experiment.training.per_device_batch_size == "auto"
    assert cfg.experiment.training.deepspeed.zero_stage == "auto"
    assert load_config(path, ["experiment.training.deepspeed.zero_stage=2",
                              "experiment.training.per_device_batch_size=8"]).experiment.training.per_device_batch_size == 8
    for key, value in [("deepspeed.zero_stage", "4"), ("deepspeed.offload_optimizer", "gpu"),
                       ("deepspeed.gradient_checkpointing", "sometimes"), ("per_device_batch_size", "0"),
                       ("per_device_batch_size", "big")]:
        with pytest.raises(ConfigError, match=f"experiment.training.{key.split('.')[0]}"):
            load_config(path, [f"experiment.training.{key}={value}"])


def test_cpu_auto_is_zero3_without_offload_or_checkpointing():
    from raysweep.losses import parse_method
    from raysweep.train import deepspeed_config, resolve_memory_plan

    cfg = _experiment(AUTO)
    resolved, plan = resolve_memory_plan(cfg, _world(2), parse_method("GA+GD"), "unused", gpu_bytes=None)
    assert plan.source == "cpu" and "no GPU memory to measure" in plan.describe()
    ds = resolved.training.deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.gradient_checkpointing) == (3, "none", False)
    assert resolved.training.per_device_batch_size == 16  # the per-rank batch (32 / 2), up to MAX_BATCH
    config = deepspeed_config(resolved, 1, use_gpu=False)
    assert config["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in config["zero_optimization"]
    assert config["train_micro_batch_size_per_gpu"] == 16
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg.training.deepspeed.zero_stage == "auto"  # the caller's config is left as it was
    with pytest.raises(ValueError, match="resolved config"):
        deepspeed_config(cfg, 1, use_gpu=False)


@pytest.mark.parametrize("method, expected", [("GA+GD", (2, "none", False, 4, 4)), ("GA+KL", (3, "none", False, 4, 4))])
def test_gpu_auto_follows_the_plan_table_into_the_deepspeed_config(method, expected):
    """7B on 2 x 80 GB (the table): GD trains ZeRO-2, KL's reference pushes it to ZeRO-3; the
    DeepSpeed config carries the plan's stage, micro-batch and accumulation."""
    from types import SimpleNamespace

    from raysweep.losses import parse_method
    from raysweep.train import accumulation_steps, deepspeed_config, resolve_memory_plan

    model = SimpleNamespace(config=_llama_config(LLAMA2_7B))
    resolved, plan = resolve_memory_plan(_experiment(AUTO, method=method), _world(2, "cuda"), parse_method(method),
                                         "unused", model=model, gpu_bytes=80 * GiB)
    assert plan.source == "estimate" and plan.plan is not None
    tr = resolved.training
    accumulation = accumulation_steps(tr.effective_batch_size, tr.per_device_batch_size, 2)
    config = deepspeed_config(resolved, accumulation, use_gpu=True)
    got = (config["zero_optimization"]["stage"], tr.deepspeed.offload_optimizer, tr.deepspeed.gradient_checkpointing,
           config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"])
    assert got == expected
    assert config["bf16"] == {"enabled": True} and config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert plan.metrics()["plan/zero_stage"] == expected[0]
    assert plan.metrics()["plan/estimate_gb"] == pytest.approx(plan.plan.estimate_bytes / GB)
    assert f"ZeRO-{expected[0]}" in plan.describe() and "estimate" in plan.describe()


def test_fixed_values_need_no_model_and_lora_holds_no_reference():
    from raysweep.config import LoraConfig
    from raysweep.losses import parse_method
    from raysweep.train import resolve_memory_plan

    fixed = {"zero_stage": 3, "offload_optimizer": "cpu", "gradient_checkpointing": True}
    resolved, plan = resolve_memory_plan(_experiment(fixed, batch=4), _world(2, "cuda"), parse_method("GA+KL"),
                                         "/nonexistent", gpu_bytes=80 * GiB)  # the model is never looked at
    assert plan.source == "config" and plan.plan is None
    assert (resolved.training.deepspeed.zero_stage, resolved.training.per_device_batch_size) == (3, 4)
    # Only the batch auto: the plan keeps the fixed ZeRO settings.
    from types import SimpleNamespace

    model = SimpleNamespace(config=_llama_config(LLAMA2_7B))
    _, plan = resolve_memory_plan(_experiment(fixed), _world(2, "cuda"), parse_method("GA+KL"), "", model=model,
                                  gpu_bytes=80 * GiB)
    assert (plan.zero_stage, plan.offload_optimizer, plan.gradient_checkpointing) == (3, "cpu", True)
    # Under LoRA, KL's reference is the adapter-free base: no second model in the estimate.
    cfg = _experiment(AUTO, method="GA+KL")
    cfg.training.lora = LoraConfig(enabled=True)
    _, plan = resolve_memory_plan(cfg, _world(2, "cuda"), parse_method("GA+KL"), "", model=model, gpu_bytes=80 * GiB)
    assert dict(plan.plan.components)["reference"] == 0 and plan.zero_stage == 2


def test_plain_torch_batch_auto_plans_a_full_replica():
    from types import SimpleNamespace

    from raysweep.losses import parse_method
    from raysweep.train import resolve_memory_plan

    model = SimpleNamespace(config=_llama_config(LLAMA2_7B))
    with pytest.raises(PlanError, match="does not fit 1 GPU"):  # 16 bytes/param of a 7B on one 80 GB GPU
        resolve_memory_plan(_experiment(None), _world(2, "cuda"), parse_method("GA+GD"), "", model=model,
                            gpu_bytes=80 * GiB)
    small = SimpleNamespace(config=_llama_config(ModelShape(0, layers=4, hidden=512, heads=8, vocab=32_000)))
    resolved, plan = resolve_memory_plan(_experiment(None), _world(2, "cuda"), parse_method("GA+GD"), "",
                                         model=small, gpu_bytes=80 * GiB)
    assert resolved.training.deepspeed is None and plan.zero_stage is None
    assert resolved.training.per_device_batch_size == 16 and "full replica" in plan.describe()


def test_measured_gpu_memory_is_the_free_memory_of_the_device(monkeypatch):
    import torch

    from raysweep.train import measured_gpu_bytes

    assert measured_gpu_bytes(_world(1)) is None  # CPU: nothing to measure
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    assert measured_gpu_bytes(_world(1, "cuda")) == 72 * GiB
