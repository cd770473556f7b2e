"""Models and tokenizers: load by HF id or local path, wrap with LoRA, build the tiny embedded model.

The embedded default (no GPU, no internet) uses a small Llama-architecture model that
``raysweep.prepare`` trains from scratch on the synthetic fictitious-authors corpus; its
architecture and training settings are :class:`TinyModelSpec`.  Everything else here works the
same for a real model given by hub id (``meta-llama/Llama-2-7b-chat-hf``) or local directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3 in a tokenizer from train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TinyModelSpec(BaseModel):
    """Architecture and training recipe of the embedded tiny Llama model.

    The defaults train both embedded models (target and retain, in parallel) on the default
    synthetic corpus in a few minutes on 2 CPU cores, to a training-set greedy ROUGE-L recall
    >= 0.95.  Training stops at the first check (every ``eval_every`` epochs, from
    ``min_epochs`` on) where greedy ROUGE-L recall on (a sample of) the factual training QA
    pairs reaches ``stop_recall``, or at ``max_epochs``, or when ``time_budget_s`` is spent.

    Recipe notes (measured on the 50-author corpus, 1 thread, epochs to recall 0.95): AdamW
    lr 1e-3 / batch 32 ~20 epochs; lr 2e-3 / batch 32 ~26; lr 1e-3 / batch 16 ~22 (slower per
    token); lr 3e-3 or batch 64 clearly slower per epoch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # architecture (LlamaConfig)
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    vocab_size: int = Field(1500, ge=300, description="BPE vocabulary size (incl. 256 bytes + 4 specials)")
    max_position_embeddings: int = Field(512, gt=0)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    # training
    template: str = Field("plain", description="prompt template of raysweep.data.formatting")
    max_length: int = Field(256, gt=8, description="tokens per training example (longer are cut)")
    prompt_loss_weight: float = Field(
        0.0, ge=0.0, description="weight of the question tokens in the LM loss (answer tokens: 1)"
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(32, gt=0)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    min_epochs: int = Field(8, ge=1)
    max_epochs: int = Field(40, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="per model; None = no limit")
    seed: int = 0

    # stop criterion
    stop_recall: float = Field(0.95, gt=0, le=1)
    eval_every: int = Field(2, ge=1)
    eval_samples: int = Field(256, gt=0, description="training QA pairs checked for the stop rule")
    eval_batch_size: int = Field(64, gt=0)
    max_new_tokens: int = Field(64, gt=0, description="greedy generation limit of the recall checks")

    @model_validator(mode="after")
    def _check(self) -> "TinyModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs {self.min_epochs} > max_epochs {self.max_epochs}")
        if self.max_length > self.max_position_embeddings:
            raise ValueError("max_length exceeds max_position_embeddings")
        return self


# --------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1500):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, bos, prepended by ``add_special_tokens=True``),
    ``</s>`` (2, eos), ``<unk>`` (3; unused by byte-level BPE, kept for compatibility).
    Save with ``tok.save_pretrained(dir)``; :func:`load_tokenizer` reads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path_or_id: str):
    """Load a tokenizer by hub id or local directory; ``pad_token`` falls back to ``eos_token``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {path_or_id!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- models


def build_tiny_model(spec: TinyModelSpec, tokenizer):
    """A freshly initialised ``LlamaForCausalLM`` sized by ``spec`` (fp32, tied embeddings).

    The vocabulary is the tokenizer's actual size (BPE may stop short of ``spec.vocab_size``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_model(path_or_id: str, dtype: str = "auto", attn_implementation: str | None = "sdpa"):
    """Load a causal LM by hub id or local directory.

    ``dtype``: ``"auto"`` (the checkpoint's own dtype), ``"float32"``, ``"bfloat16"`` or
    ``"float16"``.  ``attn_implementation``: ``"sdpa"`` (PyTorch's fused
    ``scaled_dot_product_attention``: flash / memory-efficient kernels on GPU) asked for
    explicitly; an architecture without it falls back to transformers' default, with a warning.
    """
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        torch_dtype: str | torch.dtype = "auto"
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
    # transformers >= 4.56 calls it ``dtype`` (``torch_dtype`` is deprecated there)
    kwargs = {"dtype" if _transformers_version() >= (4, 56) else "torch_dtype": torch_dtype}
    if attn_implementation is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(str(path_or_id), attn_implementation=attn_implementation,
                                                        **kwargs)
        except (ValueError, ImportError) as err:
            if attn_implementation not in str(err) and "attn_implementation" not in str(err):
                raise
            log.warning("%s: attn_implementation=%r is not supported (%s); using the architecture's default",
                        path_or_id, attn_implementation, " ".join(str(err).split())[:200])
    return AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters; tied weights counted once."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


# --------------------------------------------------------------------------- Liger kernels

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True,
                 # not the fused cross-entropies: they never materialise the logits the losses need
                 "cross_entropy": False, "fused_linear_cross_entropy": False}


def apply_liger(model) -> None:
    """Swap ``model``'s RMSNorm, SwiGLU MLP and rotary embedding for Liger's Triton kernels, in
    place (``training.liger: true``; the ``[gpu]`` extra).  One-line errors without the package,
    without CUDA, or for an architecture Liger has no kernels for."""
    if not torch.cuda.is_available():
        raise RuntimeError("training.liger: true needs a CUDA GPU (Liger's kernels are Triton); none is visible")
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as err:
        raise RuntimeError(f"training.liger: true needs liger-kernel: pip install -e '.[gpu]' ({err})") from None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"training.liger: Liger has no kernels for model type {model_type!r} "
                         f"(it has: {', '.join(sorted(monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN))}); set false")
    monkey_patch._apply_liger_kernel_to_instance(model=model, **LIGER_KERNELS)
    log.info("Liger kernels applied to the %s model: %s", model_type, [k for k, on in LIGER_KERNELS.items() if on])


# --------------------------------------------------------------------------- LoRA

# Preferred LoRA targets per architecture family, first match wins.
_DEFAULT_LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, OPT, Qwen, Phi-3 (qkv_proj handled below)
    ("query_key_value",),  # Falcon, BLOOM, GPT-NeoX
    ("c_attn",),  # GPT-2
    ("qkv_proj",),  # Phi-3
    ("query", "value"),  # BERT-style
)


def linear_module_names(model) -> list[str]:
    """Sorted short names (last dotted part) of the model's linear layers (``nn.Linear`` and
    transformers' GPT-2 ``Conv1D``), excluding the output head."""
    names: set[str] = set()
    for full, mod in model.named_modules():
        kind = type(mod).__name__
        if isinstance(mod, torch.nn.Linear) or kind == "Conv1D":
            short = full.rsplit(".", 1)[-1]
            if short not in ("lm_head", "embed_out", "output"):
                names.add(short)
    return sorted(names)


def default_lora_targets(model) -> list[str]:
    """The attention projection names LoRA targets by default (q/v style where present)."""
    present = set(linear_module_names(model))
    for group in _DEFAULT_LORA_TARGETS:
        if all(n in present for n in group):
            return list(group)
    if not present:
        raise ValueError("model has no linear layers for LoRA")
    return sorted(present)


def apply_lora(
    model,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters; only adapters are trainable.

    ``target_modules``: short module names (e.g. ``["q_proj", "v_proj"]``); ``None`` picks
    :func:`default_lora_targets`.  Names not found in the model raise ``ValueError`` listing
    the available ones.
    """
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        targets = default_lora_targets(model)
    else:
        targets = list(target_modules)
        if not targets:
            raise ValueError("target_modules is empty")
        present = set(linear_module_names(model))
        unknown = [t for t in targets if t not in present]
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {unknown}; linear modules in this model: {sorted(present)}"
            )
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


class AdapterDisabled:
    """The base model under a LoRA ``PeftModel``, used as a reference: each call runs the model
    with its adapters switched off (and in eval mode), i.e. as it was before unlearning, without
    a second copy of its weights (for a 7B model the KL reference would otherwise add 13.5 GB).

    Deliberately not an ``nn.Module``: freezing the reference, moving it or putting it in eval
    mode must not touch the model being trained, which this only borrows."""

    def __init__(self, peft_model) -> None:
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("AdapterDisabled needs a peft model (one with disable_adapter())")
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.peft_model(*args, **kwargs)
        finally:
            self.peft_model.train(was_training)
