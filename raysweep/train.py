"""The unlearning worker: one function that runs one unlearning run, with or without Ray.

``run_unlearning(cfg, reporter)`` is called as-is by ``python -m raysweep.unlearn`` (a plain
process) and by every Ray Train rank (``raysweep.tune`` wraps it); nothing here imports Ray.
Under Ray Train the process group is already initialised and ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE`` are set; we only read them.

The recipe, top to bottom:

1. resolve model and data (the embedded default is built on first use), seed everything;
   decide the memory plan's ``auto`` values (ZeRO stage, offload, gradient checkpointing,
   micro-batch: ``raysweep.memory_plan``, from the GPU memory measured here) and print it;
2. load tokenizer + model (+ LoRA; SDPA attention, Liger kernels with ``training.liger``),
   build the forget/retain/IDK data loader;
3. reference: NPO/DPO get the initial model's sequence log-probs once (a tensor, no second
   model); KL gets a frozen copy of the initial model (under LoRA: the model with its adapters
   switched off, no copy);
4. AdamW (weight decay 0.01), linear warm-up over the first epoch then linear decay, gradient
   accumulation so that per-device batch x accumulation x world size = effective batch; the
   optimizer steps and the schedule's length come from one :class:`StepPlan` (``protocol``);
   DeepSpeed ZeRO (bf16 on GPU, fp32 gradient accumulation, optional gradient checkpointing
   and CPU offload) when configured;
5. every epoch: train (one forward of the model per micro-step over all the method's batch
   parts, see ``losses.compute_loss``), evaluate, hand ``EpochReport`` to the reporter (every
   rank calls it);
6. optional checkpoint of the final or best epoch.

Steps 1-4 are :func:`build_run`, one epoch of training is :func:`train_epoch`, and
:func:`run_unlearning` runs the epochs.  A non-finite loss raises :class:`DivergenceError`
(checked once per optimizer step, not per micro-step: no host synchronisation in between),
which the caller records as a failed run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from raysweep.config import ExperimentConfig
from raysweep.data.unlearn_dataset import UnlearnDataset, collate_unlearn
from raysweep.eval.metrics import objective as objective_of
from raysweep.eval.schedule import evaluation_epochs
from raysweep.losses import LossParams, collect_reference_logps, compute_loss, parse_method
from raysweep.memory_plan import ModelShape, TrainingPlan, resolve_training
from raysweep.models import AdapterDisabled, apply_liger, apply_lora, load_model, load_tokenizer
from raysweep.scenarios import Resolved, RunData, load_run_data, resolve


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class EpochReport:
    """What the worker hands to the reporter after each epoch's evaluation."""

    epoch: int
    metrics: dict[str, float]  # "epoch", "objective", "MU", "FE", "<set>/<metric>", "train/…"
    samples: dict[str, list[dict]]  # per evaluation set, per question (the generations table)
    checkpoint: str | None = None  # directory of a checkpoint saved at this epoch, if any


@dataclass
class RunResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    checkpoint: str | None = None
    model: Any = field(default=None, repr=False)  # the trained model (Hugging Face, unwrapped)


Reporter = Callable[[EpochReport], None]
Evaluator = Callable[[torch.nn.Module, Any], "tuple[dict[str, float], dict[str, list[dict]]]"]


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world(use_gpu: bool) -> World:
    """Rank, world size and device of this process (1 process, CPU, when not distributed)."""
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    size = dist.get_world_size() if initialized else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(rank, local_rank, size, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Data parallelism without DDP wrapping (the loss may run the model and a reference)."""
    if world.size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world.size)


# ----------------------------------------------------------------------------- schedule


def accumulation_steps(effective: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation that keeps per-device batch x accumulation x world = effective."""
    per_step = per_device * world_size
    steps = max(1, round(effective / per_step))
    if steps * per_step != effective:
        print(
            f"warning: effective batch {effective} is not a multiple of per-device batch "
            f"{per_device} x world size {world_size}; using {steps * per_step}",
            file=sys.stderr,
        )
    return steps


def warmup_then_linear_decay(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak lr over ``warmup_steps``, then linear decay to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """The seed's schedule: Hugging Face ``get_linear_schedule_with_warmup`` (the Trainer's
    default), ``lr_t = lr * t / w`` for ``t < w``, else ``lr * max(0, (T - t) / max(1, T - w))``;
    step 0 has lr 0 when there is a warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class StepPlan:
    """When the optimizer steps in a run, how many times, and the warm-up of its lr schedule.

    ``raysweep``: every epoch steps after each ``accumulation`` batches and once more on the
    epoch's last, partial accumulation, ``ceil(batches / accumulation)`` steps an epoch, under
    plain torch, DDP and DeepSpeed alike (DeepSpeed's boundary is set explicitly; left to itself
    it steps only every ``accumulation`` micro-batches of the whole run, fewer steps than the
    schedule was sized for, and its lr would end far above 0).  Warm-up:
    ``round(warmup_epochs x steps per epoch)``.

    ``seed`` (``forget.py:118-125``): ``total = floor(epochs x N / (batch x accumulation x
    devices))``, warm-up = ``floor(N / (batch x accumulation x devices))`` or 0 when that is
    <= 1; the optimizer steps after every ``accumulation`` micro-batches counted over the whole
    run (epoch ends do not flush) and micro-batches after the ``total``-th step are not run.
    """

    protocol: str
    batches_per_epoch: int
    accumulation: int
    total_steps: int
    warmup_steps: int

    def _micro(self, epoch: int, i: int) -> int:
        return (epoch - 1) * self.batches_per_epoch + i

    def runs(self, epoch: int, i: int) -> bool:
        """Whether batch ``i`` (0-based) of ``epoch`` (1-based) is trained on at all."""
        return self.protocol != "seed" or self._micro(epoch, i) < self.total_steps * self.accumulation

    def boundary(self, epoch: int, i: int) -> bool:
        """Whether the optimizer steps after batch ``i`` of ``epoch``."""
        if self.protocol == "seed":
            return (self._micro(epoch, i) + 1) % self.accumulation == 0
        return (i + 1) % self.accumulation == 0 or i + 1 == self.batches_per_epoch

    def scheduler(self, optimizer):
        make = seed_linear_schedule if self.protocol == "seed" else warmup_then_linear_decay
        return make(optimizer, self.warmup_steps, self.total_steps)


def plan_steps(protocol: str, n_examples: int, batches_per_epoch: int, per_device_batch: int,
               accumulation: int, world_size: int, epochs: int, warmup_epochs: float = 1.0) -> StepPlan:
    """The :class:`StepPlan` of a run (``batches_per_epoch``: this rank's loader length)."""
    if protocol == "seed":
        effective = per_device_batch * accumulation * world_size
        per_epoch = n_examples // effective
        total = int(epochs * n_examples) // effective
        if total < 1:
            raise ValueError(
                f"protocol seed: floor(epochs x N / effective batch) = floor({epochs} x {n_examples} / "
                f"{effective}) = 0 optimizer steps; raise experiment.training.epochs or lower "
                "effective_batch_size"
            )
        return StepPlan("seed", batches_per_epoch, accumulation, total, per_epoch if per_epoch > 1 else 0)
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    return StepPlan("raysweep", batches_per_epoch, accumulation, per_epoch * epochs,
                    int(round(warmup_epochs * per_epoch)))


def precision_plan(dtype: str, device: torch.device, use_ds: bool, lora: bool) -> tuple[str, torch.dtype | None]:
    """The dtype the weights load in and the autocast dtype (or None) of a run.

    ``dtype`` is ``model.dtype`` from the config; only ``"auto"`` is decided here:

    * CPU: float32 weights, no autocast;
    * GPU + DeepSpeed: bfloat16 weights (DeepSpeed's bf16 mode keeps fp32 master weights and
      optimizer state);
    * GPU + LoRA: bfloat16 frozen base (peft keeps the adapters in float32);
    * GPU, plain full fine-tuning: float32 weights under bfloat16 autocast.  AdamW applied to
      bfloat16 weights rounds away every update below 2^-8 of the weight (8 mantissa bits), and
      at unlearning learning rates (~1e-5) that is most of them.
    """
    if dtype != "auto":
        return dtype, None
    if device.type != "cuda":
        return "float32", None
    if use_ds or lora:
        return "bfloat16", None
    return "float32", torch.bfloat16


@contextlib.contextmanager
def _zero3_init(ds_config: dict | None):
    """While open, ``from_pretrained`` loads weights straight into ZeRO-3 partitions.

    Only the trained model may load this way: a model loaded later with the setting still alive
    (the retain model of Forget Quality, the NLI and embedding models) would come out
    partitioned with no engine to gather it, and fail at its first forward.
    """
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def deepspeed_config(cfg: ExperimentConfig, grad_accum: int, use_gpu: bool) -> dict:
    """DeepSpeed config dict of a resolved run (no ``auto`` left, see :func:`resolve_memory_plan`):
    ZeRO stage, offload, bf16 on GPU (fp32 on CPU).

    Gradients accumulate in fp32 (``data_types.grad_accum_dtype``) under ZeRO 1-3: summing the
    micro-steps' bf16 gradients in bf16 rounds each addition to 8 mantissa bits.  (DeepSpeed
    has no bf16 weights + fp32 accumulation without ZeRO; stage 0 keeps the model's dtype.)
    """
    ds, tr = cfg.training.deepspeed, cfg.training
    if "auto" in (ds.zero_stage, ds.offload_optimizer, ds.gradient_checkpointing, tr.per_device_batch_size):
        raise ValueError("deepspeed_config needs a resolved config (raysweep.train.resolve_memory_plan): "
                         f"deepspeed={ds.model_dump()}, per_device_batch_size={tr.per_device_batch_size}")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            overlap_comm=use_gpu,
            contiguous_gradients=True,
        )
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": tr.per_device_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_gpu)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


# ----------------------------------------------------------------------------- memory plan


def measured_gpu_bytes(world: World) -> float | None:
    """Free memory of this run's GPUs (the smallest over the ranks, so that every rank takes the
    same plan), measured with ``torch.cuda.mem_get_info``; None on CPU."""
    if world.device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(world.device)
    usable = float(free + torch.cuda.memory_reserved(world.device))  # what this process's allocator holds counts
    if world.size > 1:
        value = torch.tensor(usable, device=world.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        usable = float(value)
    return usable


def resolve_memory_plan(cfg: ExperimentConfig, world: World, method, model_path: str,
                        model: torch.nn.Module | None = None,
                        gpu_bytes: float | None = None) -> tuple[ExperimentConfig, TrainingPlan]:
    """``cfg`` with every ``auto`` of ``training.deepspeed`` and ``per_device_batch_size``
    decided (:func:`raysweep.memory_plan.resolve_training`), and the plan it came from.

    The estimate uses the model's architecture (its config, or ``model``'s), the GPU memory
    measured on the workers (``gpu_bytes``, default :func:`measured_gpu_bytes`), the world size,
    ``data.max_length`` tokens per sequence, the method's batch parts and whether it holds a
    full reference model (KL without LoRA; under LoRA the reference is the adapter-free base).
    """
    tr = cfg.training
    if gpu_bytes is None:
        gpu_bytes = measured_gpu_bytes(world)

    def shape() -> ModelShape:
        if model is not None:
            return ModelShape.from_hf_config(model.config)
        from transformers import AutoConfig

        return ModelShape.from_hf_config(AutoConfig.from_pretrained(str(model_path)))

    plan = resolve_training(tr, shape=shape, gpu_bytes=gpu_bytes, world=world.size, seq_len=cfg.data.max_length,
                            parts=len(method.batch_keys), needs_ref=method.needs_ref_model and not tr.lora.enabled)
    update: dict[str, Any] = {"per_device_batch_size": plan.per_device_batch_size}
    if tr.deepspeed is not None:
        update["deepspeed"] = tr.deepspeed.model_copy(update={
            "zero_stage": plan.zero_stage, "offload_optimizer": plan.offload_optimizer,
            "gradient_checkpointing": plan.gradient_checkpointing})
    return cfg.model_copy(update={"training": tr.model_copy(update=update)}), plan


# ----------------------------------------------------------------------------- evaluation


def default_evaluator(cfg: ExperimentConfig, resolved: Resolved, data: RunData, world: World,
                      engine: Any = None) -> Evaluator:
    """The full evaluation of ``raysweep.eval`` (R, P, TR, TE, CS, ES per set, MU, FE); under
    ZeRO-3 on the weights gathered once per evaluation (``eval.gather``) from ``engine``."""
    from raysweep.eval.evaluate import Evaluator as FullEvaluator

    return FullEvaluator(
        cfg,
        data.eval_sets,
        retain_model=resolved.retain_model,
        data_dir=resolved.data_dir,
        device=world.device,
        synced_gpus=cfg.training.deepspeed is not None and cfg.training.deepspeed.zero_stage == 3 and world.size > 1,
        engine=engine,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything one run trains with, built once by :func:`build_run`."""

    cfg: ExperimentConfig  # resolved: no ``auto`` left
    memory: TrainingPlan
    world: World
    method: Any  # raysweep.losses.Method
    params: LossParams
    tokenizer: Any
    sampler: DistributedSampler | None
    loader: DataLoader
    steps: StepPlan
    grad_accum: int
    engine: torch.nn.Module  # the DeepSpeed engine, or the model itself
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    ref_model: Any
    ref_logps: dict[str, torch.Tensor] | None
    amp: torch.dtype | None
    use_ds: bool
    optimizer_steps: int = 0  # plain torch; DeepSpeed counts its own (engine.global_steps)
    step_lrs: list[float] = field(default_factory=list)

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps if self.use_ds else self.optimizer_steps


def _load_trained_model(path: str, dtype: str, liger: bool) -> torch.nn.Module:
    model = load_model(path, dtype=dtype)
    if liger:
        apply_liger(model)
    return model


def build_run(cfg: ExperimentConfig, *, use_gpu: bool, resolved: Resolved, data: RunData,
              model: torch.nn.Module | None, tokenizer: Any, reference: torch.nn.Module | None) -> Run:
    """Steps 1-4 of the recipe: memory plan, model, data loader, reference, optimizer, engine."""
    world = current_world(use_gpu)
    method = parse_method(cfg.training.method)
    if not data.forget:
        raise ValueError("the forget set is empty")
    if method.regularizer is not None and not data.retain:
        raise ValueError("the retain set is empty but the method has a regularizer")
    if cfg.training.liger and world.device.type != "cuda":
        raise RuntimeError("training.liger: true needs a CUDA GPU (Liger's kernels are Triton); this worker has none")
    cfg, memory = resolve_memory_plan(cfg, world, method, resolved.model, model)
    if world.is_main:
        print(f"raysweep: {memory.describe()}", file=sys.stderr, flush=True)
    tr = cfg.training
    params = LossParams(
        forget_coeff=tr.forget_coeff,
        reg_coeff=tr.reg_coeff,
        beta=tr.beta,
        me_divergence=tr.me_divergence,
        me_mask_question=tr.me_mask_question,
        protocol=cfg.protocol,
    )

    # 1-2. model, tokenizer, data
    tokenizer = tokenizer or load_tokenizer(resolved.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    use_ds = tr.deepspeed is not None
    grad_accum = accumulation_steps(tr.effective_batch_size, tr.per_device_batch_size, world.size)
    ds_config = deepspeed_config(cfg, grad_accum, use_gpu) if use_ds else None
    dtype, amp = precision_plan(cfg.model.dtype, world.device, use_ds, tr.lora.enabled)
    zero3_config = ds_config if use_ds and tr.deepspeed.zero_stage == 3 else None
    partitioned = model is None and zero3_config is not None  # weights born in ZeRO-3 partitions
    if model is None:
        with _zero3_init(zero3_config):
            model = _load_trained_model(resolved.model, dtype, tr.liger)
    elif tr.liger:
        apply_liger(model)
    if use_ds and tr.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    dataset = UnlearnDataset(
        data.forget, data.retain, data.idk_templates, tokenizer,
        cfg.model.prompt_template, cfg.data.max_length, tr.seed, pairing=cfg.protocol,
    )
    if cfg.protocol == "seed":  # the seed pads every sample to max_length with EOS (unattended); see FIDELITY.md
        collate = lambda items: collate_unlearn(  # noqa: E731
            items, tokenizer.eos_token_id, length=cfg.data.max_length, seed_layout=True)
    else:
        collate = lambda items: collate_unlearn(items, pad_id)  # noqa: E731
    sampler = (
        DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=tr.seed)
        if world.size > 1
        else None
    )
    generator = torch.Generator().manual_seed(tr.seed)
    loader = DataLoader(
        dataset,
        batch_size=tr.per_device_batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collate,
        generator=generator if sampler is None else None,
    )

    # 3. reference: a snapshot of the model as this run starts (NPO/DPO: log-probs, KL:
    # distributions); the continual scenario may pass the initial model instead.
    ref_model = None
    if reference is not None and (method.needs_ref_model or method.needs_ref_logps):
        ref_model = _freeze(reference)
    elif method.needs_ref_model and tr.lora.enabled:
        pass  # the LoRA model with its adapters switched off, set once the adapters exist
    elif method.needs_ref_model and partitioned:
        # A partitioned model cannot be deep-copied (each parameter is an empty shell plus
        # DeepSpeed state): load the reference from the same weights, partitioned likewise.
        with _zero3_init(zero3_config):
            ref_model = _freeze(_load_trained_model(resolved.model, dtype, tr.liger))
    elif method.needs_ref_model:
        ref_model = _freeze(copy.deepcopy(model))
    if not use_ds:
        model.to(world.device)
        if ref_model is not None:
            ref_model.to(world.device)

    if tr.lora.enabled:
        model = apply_lora(model, r=tr.lora.r, alpha=tr.lora.alpha, dropout=tr.lora.dropout,
                           target_modules=tr.lora.target_modules)
        if method.needs_ref_model and ref_model is None:
            ref_model = AdapterDisabled(model)  # the frozen base is the starting model
    trainable = [p for p in model.parameters() if p.requires_grad]

    # 4. optimisation
    steps = plan_steps(cfg.protocol, len(dataset), len(loader), tr.per_device_batch_size, grad_accum,
                       world.size, tr.epochs, tr.warmup_epochs)
    if use_ds and tr.deepspeed.offload_optimizer == "cpu":
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed insists on its own CPU Adam
        # (JIT-compiled on first use; AdamW semantics with adamw_mode=True).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable, lr=tr.lr, weight_decay=tr.weight_decay, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=tr.lr, weight_decay=tr.weight_decay)
    scheduler = steps.scheduler(optimizer)
    engine = model
    if use_ds:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=trainable,
        )
        if ref_model is not None and not isinstance(ref_model, AdapterDisabled):
            ref_config = {k: v for k, v in ds_config.items() if k not in ("gradient_accumulation_steps", "data_types")}
            if tr.deepspeed.zero_stage != 3:
                ref_config["zero_optimization"] = {"stage": 0}
            ref_model, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
            ref_model.eval()
        world = World(world.rank, world.local_rank, world.size, engine.device)

    ref_logps = None
    if method.needs_ref_logps:
        full_loader = DataLoader(dataset, batch_size=tr.per_device_batch_size, shuffle=False, collate_fn=collate)
        with _autocast(world.device, amp):
            ref_logps = collect_reference_logps(
                engine if reference is None else ref_model,
                (_to_device(b, world.device) for b in full_loader), len(dataset), method.ref_logp_keys,
            )
        if not method.needs_ref_model:
            ref_model = None  # NPO/DPO need only the log-probs: hold no second model

    return Run(cfg, memory, world, method, params, tokenizer, sampler, loader, steps, grad_accum, engine,
               optimizer, scheduler, trainable, ref_model, ref_logps, amp, use_ds)


def check_finite(losses: list[tuple[int, int, torch.Tensor]], run: Run) -> None:
    """Raise :class:`DivergenceError` naming the first non-finite loss of ``losses`` (epoch,
    batch, value); one host synchronisation for all of them."""
    if not losses:
        return
    values = torch.stack([loss for _, _, loss in losses])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0, 0])
    epoch, batch, _ = losses[first]
    raise DivergenceError(
        f"loss became {float(values[first])} at epoch {epoch}, batch {batch} "
        f"(method {run.method.name}, lr {run.cfg.training.lr}); the run stops here"
    )


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One epoch of micro-steps: ``{"loss", "forget_loss", "reg_loss"}`` averaged over its batches.

    No host synchronisation per micro-step: the loss parts are summed on the device and the
    losses checked for NaN/inf once per optimizer step (before the step is applied), and once
    more at the epoch's end for micro-steps after the last step (protocol seed).
    """
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    run.engine.train()
    device = run.world.device
    sums = {k: torch.zeros((), device=device) for k in ("loss", "forget_loss", "reg_loss")}
    unchecked: list[tuple[int, int, torch.Tensor]] = []  # micro-steps since the last optimizer step
    n_batches = 0
    for i, batch in enumerate(run.loader):
        if not run.steps.runs(epoch, i):
            break  # seed protocol: the planned optimizer steps are done
        batch = _to_device(batch, device)
        with _autocast(device, run.amp):
            loss, parts = compute_loss(run.method, run.engine, batch, run.params, ref_model=run.ref_model,
                                       ref_logps=run.ref_logps, as_tensors=True)
        for k in sums:
            sums[k] += parts[k]
        unchecked.append((epoch, i, loss.detach()))
        n_batches += 1
        boundary = run.steps.boundary(epoch, i)
        if boundary:
            run.step_lrs.append(float(run.scheduler.get_last_lr()[0]))  # the lr this step applies
        if run.use_ds:
            # The plan, not DeepSpeed's own micro-step counter, decides the boundaries.
            run.engine.set_gradient_accumulation_boundary(boundary)
            run.engine.backward(loss)
            if boundary:
                check_finite(unchecked, run)
                unchecked.clear()
            run.engine.step()  # steps optimizer and scheduler at the boundary only
            continue
        (loss / run.grad_accum).backward()
        if boundary:
            check_finite(unchecked, run)
            unchecked.clear()
            average_gradients(run.trainable, run.world)
            torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.optimizer_steps += 1
    check_finite(unchecked, run)
    return {k: float(v) / max(1, n_batches) for k, v in sums.items()}


def run_unlearning(
    cfg: ExperimentConfig,
    reporter: Reporter | None = None,
    *,
    use_gpu: bool = False,
    evaluator: Evaluator | None = None,
    resolved: Resolved | None = None,
    data: RunData | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    reference: torch.nn.Module | None = None,
    evaluate_epochs: str = "every",
) -> RunResult:
    """Run one unlearning run described by ``cfg`` and report after every evaluated epoch.

    ``model``/``tokenizer``/``data`` let a caller (the continual scenario) chain runs on an
    in-memory model; by default they are loaded from ``cfg``.  ``reference``: the model NPO,
    DPO and KL compare with (default: this run's starting model).  ``evaluate_epochs``:
    ``"every"`` epoch that ``eval.every`` names (all, or the ASHA rungs and the last), or only
    the ``"last"`` one.
    """
    if evaluate_epochs not in ("every", "last"):
        raise ValueError(f"evaluate_epochs must be 'every' or 'last', got {evaluate_epochs!r}")
    seed_everything(cfg.training.seed)
    resolved = resolved or resolve(cfg)
    data = data or load_run_data(cfg, resolved)
    run = build_run(cfg, use_gpu=use_gpu, resolved=resolved, data=data, model=model, tokenizer=tokenizer,
                    reference=reference)
    cfg, tr = run.cfg, run.cfg.training
    if evaluator is None:
        evaluator = default_evaluator(cfg, resolved, data, run.world, run.engine if run.use_ds else None)
    eval_epochs = set(evaluation_epochs("last" if evaluate_epochs == "last" else cfg.eval.every,
                                        tr.epochs, cfg.eval.rung_epochs))

    # 5. epochs
    result = RunResult()
    best_objective = -math.inf
    for epoch in range(1, tr.epochs + 1):
        started = time.perf_counter()
        train_losses = train_epoch(run, epoch)
        train_seconds = time.perf_counter() - started
        if epoch not in eval_epochs:
            continue  # eval.every: rungs evaluates (and reports) only where ASHA decides

        run.engine.eval()
        started = time.perf_counter()
        with torch.no_grad(), _autocast(run.world.device, run.amp):
            metrics, samples = evaluator(_unwrap(run.engine), run.tokenizer)
        metrics = dict(metrics)
        metrics.update({f"train/{k}": v for k, v in train_losses.items()})
        metrics.update({
            "epoch": epoch,
            "train/lr": float(run.scheduler.get_last_lr()[0]) if hasattr(run.scheduler, "get_last_lr") else tr.lr,
            "train/optimizer_steps": float(run.global_steps),
            "train/planned_steps": float(run.steps.total_steps),
            "train/gradient_accumulation": float(run.grad_accum),
            "time/train_s": train_seconds,
            "time/eval_s": time.perf_counter() - started,
        })
        metrics.update(run.memory.metrics())
        if run.step_lrs:
            metrics["train/lr_last_step"] = run.step_lrs[-1]  # the lr the latest optimizer step applied
        if run.use_ds:
            metrics["train/zero_stage"] = float(run.engine.zero_optimization_stage())
        if "objective" not in metrics and "MU" in metrics and "FE" in metrics:
            metrics["objective"] = objective_of(metrics["MU"], metrics["FE"])

        # 6. checkpoint
        checkpoint = None
        objective = metrics.get("objective", -math.inf)
        is_best = objective > best_objective
        if is_best:
            best_objective = objective
            result.best = metrics
        if tr.save_checkpoint == "best" and is_best or tr.save_checkpoint == "final" and epoch == tr.epochs:
            checkpoint = save_checkpoint(run.engine, run.tokenizer, _output_dir(cfg) / tr.save_checkpoint, run.world,
                                         run.use_ds)
            result.checkpoint = checkpoint
        result.history.append(metrics)
        if reporter is not None:
            reporter(EpochReport(epoch, metrics, samples, checkpoint))
    result.model = _unwrap(run.engine)
    return result


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _output_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.training.output_dir or Path("outputs") / cfg.name)


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: v.to(device) for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        else:
            out[key] = value
    return out


def _unwrap(engine: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (generation needs ``.generate``)."""
    return getattr(engine, "module", engine)


def save_checkpoint(engine, tokenizer, directory: Path, world: World, use_ds: bool) -> str:
    """Save the model in Hugging Face format (LoRA adapters are merged) on rank 0."""
    directory.mkdir(parents=True, exist_ok=True)
    model = _unwrap(engine)
    state_dict = None
    if use_ds:
        # Every rank takes part in gathering ZeRO-3 partitions; only rank 0 gets the full dict.
        state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_partition_weights() else None
    if world.is_main:
        to_save = model
        if hasattr(model, "merge_and_unload"):
            to_save = copy.deepcopy(model).merge_and_unload()
            state_dict = None
        to_save.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    if world.size > 1:
        dist.barrier()
    return str(directory)
