"""Plan a trial's GPU memory: ZeRO stage, optimizer offload, gradient checkpointing, batch size.

``deepspeed: {zero_stage: auto, offload_optimizer: auto, gradient_checkpointing: auto}`` and
``per_device_batch_size: auto`` are decided here, from the model's size, the GPU's memory, the
trial's world size and the method (how many sequences a step trains, whether KL keeps a
reference model). The accounting is docs/SCALING.md §2 (the ZeRO paper's 16 bytes/parameter for
bf16 mixed-precision AdamW), per GPU:

=====================  ============================================================
ZeRO-2                 bf16 weights 2·P  +  (bf16 grads 2 + fp32 master/m/v 12)·P / N
ZeRO-3                 16·P / N
ZeRO-3 + CPU offload   bf16 weight and gradient partitions 4·P / N (the rest on the CPU)
KL reference           bf16 weights: 2·P (ZeRO-2), 2·P / N (ZeRO-3, partitioned too)
activations / part     checkpointed: L·B·T·d·2 + one layer recomputed; else every layer
                       (34·B·T·d + 5·h·B·T²) bytes (Korthikanti et al.); logits B·T·V·10
buffers                ZeRO-3 gathered weights and buckets 3 GB; ZeRO-2 buckets 2 GB
context                CUDA context, NCCL, fragmentation: 2.5 GB
=====================  ============================================================

and the plan must stay under 90 % of the GPU's total memory. The candidates are tried from the
fastest to the most frugal: ZeRO-2 (no per-layer gathers), ZeRO-3, ZeRO-3 with the optimizer on
the CPU; each first without gradient checkpointing (no recompute), then with it. A candidate is
taken if a micro-batch of at least ``MIN_BATCH`` (or the whole per-rank batch, if smaller) fits;
the batch is then the largest divisor of the per-rank batch that fits, up to ``MAX_BATCH``.

Everything here is arithmetic over stated assumptions: an estimate, printed as one at trial
start, never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
HEADROOM = 0.90  # of the GPU's total memory
CONTEXT_BYTES = 2.5 * GB
BUFFER_BYTES = {2: 2.0 * GB, 3: 3.0 * GB}
MIN_BATCH = 4
MAX_BATCH = 16
# (zero_stage, offload_optimizer, gradient_checkpointing), fastest first.
CANDIDATES: tuple[tuple[int, bool, bool], ...] = (
    (2, False, False), (2, False, True), (3, False, False), (3, False, True), (3, True, True),
)


class PlanError(ValueError):
    """No candidate fits: the message gives the smallest estimate and the budget."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a causal LM."""

    n_params: int
    layers: int
    hidden: int
    heads: int
    vocab: int

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """Exact parameter count by instantiating the architecture on the meta device (no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(n_params=n_params, layers=text.num_hidden_layers, hidden=text.hidden_size,
                   heads=text.num_attention_heads, vocab=text.vocab_size)


@dataclass(frozen=True)
class Plan:
    zero_stage: int
    offload_optimizer: bool
    gradient_checkpointing: bool
    per_device_batch_size: int
    gradient_accumulation: int
    estimate_bytes: float  # per GPU
    budget_bytes: float
    components: tuple[tuple[str, float], ...]

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in self.components)
        return (
            f"memory plan (estimate, docs/SCALING.md §2 accounting): ZeRO-{self.zero_stage}, "
            f"offload_optimizer={'cpu' if self.offload_optimizer else 'none'}, "
            f"gradient_checkpointing={self.gradient_checkpointing}, per_device_batch_size="
            f"{self.per_device_batch_size} x accumulation {self.gradient_accumulation}; "
            f"{self.estimate_bytes / GB:.1f} GB per GPU of a {self.budget_bytes / GB:.1f} GB budget ({parts} GB)"
        )


def state_bytes(n_params: int, world: int, stage: int, offload: bool) -> float:
    """Weights, gradients and optimizer state held on one GPU (see the module table)."""
    p, n = float(n_params), float(world)
    if stage == 3:
        return 4 * p / n if offload else 16 * p / n
    if stage == 2:
        return 2 * p + (2 * p / n if offload else 14 * p / n)
    raise ValueError(f"zero stage {stage} is not planned (2 or 3)")


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, parts: int, checkpointing: bool) -> float:
    """Activations alive at the backward of one micro-step: every part's (raysweep sums the
    parts' losses before one backward), bf16."""
    b, t, d = batch, seq_len, shape.hidden
    layer = 34 * b * t * d + 5 * shape.heads * b * t * t
    kept = shape.layers * b * t * d * 2 + layer if checkpointing else shape.layers * layer
    logits = b * t * shape.vocab * 10
    return parts * (kept + logits)


def estimate(shape: ModelShape, *, world: int, stage: int, offload: bool, checkpointing: bool, batch: int,
             seq_len: int, parts: int, needs_ref: bool) -> tuple[tuple[str, float], ...]:
    """The per-GPU components of one configuration, in bytes."""
    ref = (2 * shape.n_params / world if stage == 3 else 2 * shape.n_params) if needs_ref else 0.0
    return (
        ("states", state_bytes(shape.n_params, world, stage, offload)),
        ("reference", float(ref)),
        ("activations", float(activation_bytes(shape, batch, seq_len, parts, checkpointing))),
        ("buffers", BUFFER_BYTES[stage]),
        ("context", CONTEXT_BYTES),
    )


def _divisors(n: int, cap: int) -> list[int]:
    return [b for b in range(min(n, cap), 0, -1) if n % b == 0]


def plan_memory(shape: ModelShape, *, gpu_bytes: float, world: int, seq_len: int, parts: int, needs_ref: bool,
                effective_batch: int, batch: int | None = None, stage: int | None = None,
                offload: bool | None = None, checkpointing: bool | None = None) -> Plan:
    """The fastest configuration that fits; fixed values (not ``None``) are kept as given.

    ``effective_batch`` is per-device batch × accumulation × world; when it is not a multiple of
    the world size the per-rank batch is rounded up (as :func:`raysweep.train.accumulation_steps`).
    """
    budget = HEADROOM * gpu_bytes
    per_rank = max(1, -(-effective_batch // world))
    wanted = (stage, offload, checkpointing)
    options = []  # (candidate index, batch, total, components), fastest candidate and largest batch first
    for index, candidate in enumerate(CANDIDATES):
        if any(w is not None and w != c for w, c in zip(wanted, candidate)):
            continue
        for b in ([batch] if batch is not None else _divisors(per_rank, MAX_BATCH)):
            comps = estimate(shape, world=world, stage=candidate[0], offload=candidate[1],
                             checkpointing=candidate[2], batch=b, seq_len=seq_len, parts=parts, needs_ref=needs_ref)
            options.append((index, b, sum(v for _, v in comps), comps))
    if not options:
        raise PlanError(f"no ZeRO configuration matches stage={stage}, offload={offload}, checkpointing={checkpointing}")
    fitting = [o for o in options if o[2] <= budget]
    useful = [o for o in fitting if batch is not None or o[1] >= min(MIN_BATCH, per_rank)]
    # A useful batch on the fastest candidate; else, nothing fits at a useful batch: the most
    # frugal candidate that fits at all (largest batch on it).
    chosen = useful[0] if useful else (max(fitting, key=lambda o: (o[0], o[1])) if fitting else None)
    if chosen is None:
        index, b, total, _ = min(options, key=lambda o: o[2])
        s, o, c = CANDIDATES[index]
        raise PlanError(
            f"a {shape.n_params / 1e9:.2f} B-parameter model does not fit {world} GPU(s) of "
            f"{gpu_bytes / GB:.0f} GB: the smallest estimate is {total / GB:.1f} GB per GPU (ZeRO-{s}, "
            f"offload={'cpu' if o else 'none'}, checkpointing={c}, batch {b}) against a budget of "
            f"{budget / GB:.1f} GB; use more GPUs per trial (search.resources.num_workers) or LoRA"
        )
    index, b, total, comps = chosen
    s, o, c = CANDIDATES[index]
    return Plan(s, o, c, b, -(-per_rank // b), total, budget, comps)


# ----------------------------------------------------------------------------- config values

CPU_ZERO_STAGE = 3  # the stage DeepSpeed's CPU path (gloo) is tested with here


@dataclass(frozen=True)
class TrainingPlan:
    """The concrete values a run trains with, after every ``auto`` of the config is decided.

    ``zero_stage`` is None without DeepSpeed. ``source`` says where the values came from:
    ``"config"`` (nothing was auto), ``"estimate"`` (:func:`plan_memory` against measured GPU
    memory; ``plan`` holds it) or ``"cpu"`` (no GPU memory to measure: the fixed CPU values).
    """

    zero_stage: int | None
    offload_optimizer: str  # "cpu" | "none"
    gradient_checkpointing: bool
    per_device_batch_size: int
    source: str
    plan: Plan | None = None

    def describe(self) -> str:
        if self.plan is not None and self.zero_stage == self.plan.zero_stage:
            return self.plan.describe()
        if self.plan is not None:  # plain torch or ZeRO-0/1: a full replica on every GPU
            trains = "no DeepSpeed" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
            return (f"{self.plan.describe()}; trains with {trains}: a full replica per GPU, "
                    "estimated as ZeRO-2 on one GPU (16 bytes/param)")
        stage = "no DeepSpeed" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        why = ("as configured" if self.source == "config" else
               "CPU run: no GPU memory to measure, so auto is ZeRO-3 without offload or checkpointing "
               "and the per-rank batch up to " + str(MAX_BATCH))
        return (f"memory plan ({why}): {stage}, offload_optimizer={self.offload_optimizer}, "
                f"gradient_checkpointing={self.gradient_checkpointing}, "
                f"per_device_batch_size={self.per_device_batch_size}")

    def metrics(self) -> dict[str, float]:
        """The resolved values as numbers, for the epoch report (and so MLflow)."""
        out = {
            "plan/zero_stage": float(-1 if self.zero_stage is None else self.zero_stage),
            "plan/offload_optimizer": float(self.offload_optimizer == "cpu"),
            "plan/gradient_checkpointing": float(self.gradient_checkpointing),
            "plan/per_device_batch_size": float(self.per_device_batch_size),
        }
        if self.plan is not None:
            out["plan/estimate_gb"] = self.plan.estimate_bytes / GB
            out["plan/budget_gb"] = self.plan.budget_bytes / GB
        return out


def _auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def resolve_training(training, *, shape, gpu_bytes: float | None, world: int, seq_len: int, parts: int,
                     needs_ref: bool) -> TrainingPlan:
    """Decide the ``auto`` values of ``training`` (a ``raysweep.config.TrainingConfig``).

    ``shape``: a :class:`ModelShape` or a function returning one (called only when something is
    auto and a GPU was measured). ``gpu_bytes``: the GPU memory this run may use (the smallest
    over its ranks), None on CPU. ``parts``: sequences a step trains on per example;
    ``needs_ref``: a full reference model is held (KL without LoRA). Fixed values are kept.

    Without DeepSpeed (plain torch or DDP: a full fp32 replica per GPU, 16 bytes/param, what
    the ZeRO-2 formula gives at world size 1) only the batch can be auto; ZeRO-0/1 are planned
    the same way (full replica, no offload). Raises :class:`PlanError` when nothing fits.
    """
    ds = training.deepspeed
    per_rank = max(1, -(-training.effective_batch_size // world))
    batch = None if _auto(training.per_device_batch_size) else int(training.per_device_batch_size)
    stage = None if ds is None or _auto(ds.zero_stage) else int(ds.zero_stage)
    offload = None if ds is None or _auto(ds.offload_optimizer) else ds.offload_optimizer == "cpu"
    ckpt = None if ds is None or _auto(ds.gradient_checkpointing) else bool(ds.gradient_checkpointing)
    replica = ds is None or stage in (0, 1)  # every rank holds the whole training state
    if ds is None:
        offload, ckpt = False, False
    elif stage in (0, 1):
        offload = False if offload is None else offload

    def concrete(s, o, c, b, source, plan=None) -> TrainingPlan:
        return TrainingPlan(None if ds is None else s, "cpu" if o else "none", bool(c), b, source, plan)

    if batch is not None and (ds is None or None not in (stage, offload, ckpt)):
        return concrete(stage, offload, ckpt, batch, "config")
    if gpu_bytes is None:
        b = batch if batch is not None else _divisors(per_rank, MAX_BATCH)[0]
        return concrete(CPU_ZERO_STAGE if stage is None else stage, bool(offload), bool(ckpt), b, "cpu")
    shape = shape() if callable(shape) else shape
    if replica:
        plan = plan_memory(shape, gpu_bytes=gpu_bytes, world=1, seq_len=seq_len, parts=parts, needs_ref=needs_ref,
                           effective_batch=per_rank, batch=batch, stage=2, offload=offload, checkpointing=ckpt)
        return concrete(stage, plan.offload_optimizer, plan.gradient_checkpointing, plan.per_device_batch_size,
                        "estimate", plan)
    plan = plan_memory(shape, gpu_bytes=gpu_bytes, world=world, seq_len=seq_len, parts=parts, needs_ref=needs_ref,
                       effective_batch=training.effective_batch_size, batch=batch, stage=stage, offload=offload,
                       checkpointing=ckpt)
    return concrete(plan.zero_stage, plan.offload_optimizer, plan.gradient_checkpointing,
                    plan.per_device_batch_size, "estimate", plan)
