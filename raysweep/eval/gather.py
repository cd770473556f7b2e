"""Evaluation on gathered ZeRO-3 weights: one all-gather per evaluation instead of one per call.

Under ZeRO-3 every parameter lives in 1/world partitions and DeepSpeed's module hooks all-gather
each layer before its forward and free it after. Left on during evaluation, that happens at every
decoding step of every generated token (``generate(synced_gpus=True)``, all ranks in lock-step):
about 6.7 GB per step per rank on a 7B model. Instead, as DeepSpeed's
``unwrap_model_for_generation`` (used by TRL's trainers), the evaluation:

1. decides from **measured** free memory whether the full 16-bit weights fit on every rank next
   to the training state (``gather: auto``), plus the evaluation's own working memory;
2. if not, frees what DeepSpeed can move to the CPU (``engine.offload_states``: gradient buffers,
   and with DeepSpeed's FusedAdam also the optimizer states and fp32 master weights) and
   measures again;
3. gathers the weights once and takes the ZeRO-3 hooks off; generation then runs without
   ``synced_gpus`` with the KV cache, each rank on its own share of the questions, and the
   likelihood passes (P, TR, membership inference) run on the same weights;
4. afterwards re-adds the hooks, releases the gathered copy and reloads what step 2 offloaded.

When the copy still does not fit, the evaluation falls back to the hooked, synced path (today's)
and says so: once in the log, and in the metrics as ``eval/gather_fallback = 1`` (the sweep tracker
turns that into the MLflow tag ``raysweep.eval_weights = synced-fallback``). Every ZeRO-3
evaluation reports ``eval/gathered`` (1 or 0).

``eval.gather``: ``auto`` (the above), ``always`` (gather without looking at memory), ``never``
(the hooked, synced path). ``RAYSWEEP_EVAL_FREE_BYTES=<bytes>`` pretends that much memory is free
on every rank (tests force the fallback with it); it is read where the memory is measured.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

FREE_BYTES_ENV = "RAYSWEEP_EVAL_FREE_BYTES"
HEADROOM = 0.9  # use at most this fraction of the free memory (fragmentation, allocator slack)

__all__ = ["FREE_BYTES_ENV", "GatherPlan", "is_zero3", "gathered_weight_bytes", "working_bytes",
           "free_bytes", "plan_gather", "evaluation_weights"]


@dataclass(frozen=True)
class GatherPlan:
    """How one evaluation gets its weights, and the figures the choice came from."""

    gathered: bool
    reason: str
    need_bytes: int = 0  # gathered copy + evaluation working memory, on this rank
    free_bytes: int = 0  # the smallest free memory over the ranks (after any offload)
    offloaded: bool = False  # engine.offload_states was called (reload after the evaluation)
    fallback: bool = False  # eval.gather auto, and the weights did not fit: the hooked, synced path


def is_zero3(engine: Any) -> bool:
    """Whether ``engine`` is a DeepSpeed engine whose weights are ZeRO-3 partitioned."""
    check = getattr(engine, "zero_optimization_partition_weights", None)
    return bool(check and check())


def gathered_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the full copy of ``module``'s partitioned weights takes on one rank."""
    total = 0
    for p in module.parameters():
        total += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return total


def working_bytes(model_config: Any, batch_size: int, max_length: int, element_size: int) -> int:
    """The evaluation's working memory beyond the weights, from the model's shape: the KV cache
    of one generation batch and the logits of one likelihood batch (upcast to float32)."""
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    heads = int(getattr(model_config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(model_config, "num_key_value_heads", heads) or heads)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    kv_cache = 2 * layers * batch_size * max_length * (hidden * kv_heads // heads) * element_size
    logits = batch_size * max_length * vocab * (element_size + 4)
    return kv_cache + logits


def free_bytes(device: torch.device) -> int:
    """Memory free for a new allocation on ``device``: on a GPU the driver's free memory plus
    what PyTorch's caching allocator holds unused; on the CPU the OS's available memory.
    ``$RAYSWEEP_EVAL_FREE_BYTES`` replaces the measurement (tests)."""
    forced = os.environ.get(FREE_BYTES_ENV)
    if forced:
        return int(float(forced))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def _min_over_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _offloadable(engine: Any) -> list:
    """The states ``engine.offload_states`` can move to the CPU here (DeepSpeed 0.19: the
    optimizer states and fp32 master weights only with its FusedAdam; never the 16-bit weight
    partitions, which the gather needs; nothing when parameters are offloaded already)."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    if isinstance(engine.optimizer, DeepSpeedZeRoOffload) or engine.optimizer is None:
        return []
    param_offload = engine.zero_offload_param()
    if param_offload is not None and param_offload.device != OffloadDeviceEnum.none:
        return []
    states = [OffloadStateTypeEnum.lp_grads, OffloadStateTypeEnum.contiguous_grad_buffer]
    from deepspeed.ops.adam import FusedAdam

    if isinstance(getattr(engine.optimizer, "optimizer", None), FusedAdam):
        states += [OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params]
    return states


def plan_gather(engine: Any, mode: str, batch_size: int, max_length: int) -> GatherPlan:
    """Collective (every rank calls it): whether this evaluation gathers the weights.

    May call ``engine.offload_states`` (then ``plan.offloaded``: the caller reloads after)."""
    if not is_zero3(engine):
        return GatherPlan(False, "weights are not ZeRO-3 partitioned")
    if mode == "never":
        return GatherPlan(False, "eval.gather is never")
    module = engine.module
    element = next(module.parameters()).element_size()
    need = gathered_weight_bytes(module) + working_bytes(getattr(module, "config", None), batch_size, max_length, element)
    if mode == "always":
        return GatherPlan(True, "eval.gather is always", need)
    device = engine.device
    free = _min_over_ranks(free_bytes(device), device)
    if need <= HEADROOM * free:
        return GatherPlan(True, "fits", need, free)
    states = _offloadable(engine) if device.type == "cuda" else []
    if states:
        engine.offload_states(include=states)
        free = _min_over_ranks(free_bytes(device), device)
        if need <= HEADROOM * free:
            return GatherPlan(True, f"fits after offloading {', '.join(s.value for s in states)}", need, free, True)
        engine.reload_states()
    return GatherPlan(False, f"the gathered weights need {need / 2**30:.3g} GiB but {HEADROOM * free / 2**30:.3g} GiB "
                             f"is usable (min free over ranks)", need, free, fallback=True)


@contextlib.contextmanager
def evaluation_weights(engine: Any, mode: str, batch_size: int, max_length: int) -> Iterator[GatherPlan]:
    """While open, ``engine.module`` holds the full weights without ZeRO-3 hooks when the plan
    says ``gathered`` (else the weights stay partitioned and hooked: synced path)."""
    plan = plan_gather(engine, mode, batch_size, max_length)
    if not plan.gathered:
        yield plan
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    try:
        with unwrap_model_for_generation(engine):
            yield plan
    finally:
        if plan.offloaded:
            engine.reload_states()
