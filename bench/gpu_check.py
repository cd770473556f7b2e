"""The GPU path, checked on a real GPU: the worker's precision/DeepSpeed variants + a 7B-width step.

    python bench/gpu_check.py --out DIR [--epochs 2] [--skip-throughput]

Part A runs ``python -m raysweep.unlearn`` on the embedded default (``search_spaces/tiny.yaml``,
``use_gpu: true``) in the configurations the GPU path has, each a separate process:

* ``plain``        — full fine-tuning without DeepSpeed (fp32 weights under bf16 autocast);
* ``lora``         — LoRA on a bf16 base;
* ``zero3``        — DeepSpeed ZeRO-3, bf16, gradient checkpointing, final checkpoint gathered;
* ``zero3_kl``     — ZeRO-3 with a KL reference model (a second DeepSpeed engine);
* ``zero3_offload``— ZeRO-3 with the optimizer offloaded to CPU (DeepSpeedCPUAdam, JIT-built).

Evaluation is the full one (R, P, TR, TE, CS, ES, Forget Quality, MIA); with no hub access CS
and ES use tiny random sentence-embedding / NLI models this script builds (the point is that
they run on the GPU, not their values).  Each variant's per-epoch metrics, wall time and
peak GPU memory are written to ``DIR/gpu_check.json``; a variant fails the check if it exits
non-zero or reports a non-finite or out-of-range MU/FE/objective.

Part B times optimizer steps of a Llama-2-7B-width model (hidden 4096, 32 heads, MLP 11008,
vocab 32000; ``--layers`` of its 32 layers, default 16, so that full fine-tuning fits one GPU
without offload) under the worker's own DeepSpeed config (ZeRO-3, bf16, gradient
checkpointing) and NPO+GD loss, per-device batch 4 x ``--seq`` tokens — the per-step cost
that docs/SCALING.md's wall-time estimates scale from.

Single process: ``RANK=0 WORLD_SIZE=1`` etc. are set for DeepSpeed.  Run on a GPU machine;
``--cpu-smoke`` runs the same steps on CPU with tiny sizes to check the script itself.

``--old-vs-new`` (issue #13) runs instead, side by side, each part in its own process (so that
its peak memory is its own) and within its own time budget (``PART_BUDGET_S``, ≤ 8 min in all):

* (a) one evaluation of a random Llama-2-7B-width model (all 32 layers when the GPU has
  ≥ 100 GiB, else 16) under ZeRO-3, through ``raysweep.eval.evaluate.Evaluator`` itself, on
  TOFU-sized sets (forget 400, retain 400, real authors 100, world facts 117; privacy on a
  400-question holdout), ``max_length`` 200: ``eval_old`` = the hooked path
  (``eval.gather: never``, batch 16) on a measured slice of 2 batches (forget 16 + retain 16
  questions; its full-evaluation time is that slice scaled by questions, and labelled so);
  ``eval_new`` = the gathered path on the same slice at the same batch, then on the full sets
  at batch 64;
* (b) training through ``raysweep.train.run_unlearning`` itself (NPO+GD, 64 forget + retain
  pairs of ``SEQ_TOKENS`` tokens, 2 epochs, the second timed) of the 16-layer 7B-width slice:
  ``train_old`` = today's config (ZeRO-3, gradient checkpointing, micro-batch 4, one forward per
  loss part), ``train_new`` = :data:`NEW_TRAINING` (the planner's ``auto`` keys; it exists once
  the training half of issue #13 is merged — before that the part records why it cannot run);
  trained tokens/s and MFU (6N FLOPs per trained token over the bf16 matmul rate measured here);
* (c) the peak GPU memory (``torch.cuda.max_memory_allocated``) of every part.

It writes ``OUT/gpu_check_old_vs_new.json`` and prints a Markdown table.  A part that fails or
runs out of its budget is recorded with its error: it never gets a figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a an of in on and to is was were author book wrote born father mother city year "
         "novel genre award his her their what where when who which how did does published").split()

VARIANTS = {
    "plain": ("ME+GD", []),
    "lora": ("IDK+AP", ["experiment.training.lora.enabled=true", "experiment.training.lr=3e-3"]),
    "zero3": ("NPO+GD", ["experiment.training.deepspeed={zero_stage: 3, offload_optimizer: none, gradient_checkpointing: true}",
                         "experiment.training.save_checkpoint=final"]),
    "zero3_kl": ("ME+KL", ["experiment.training.deepspeed={zero_stage: 3, offload_optimizer: none, gradient_checkpointing: true}"]),
    "zero3_offload": ("DPO+AP", ["experiment.training.deepspeed={zero_stage: 3, offload_optimizer: cpu, gradient_checkpointing: true}"]),
}


def _word_tokenizer(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(s, vocab[s]) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def build_tiny_semantic_models(root: Path) -> tuple[str, str]:
    """A random 1-layer BERT NLI classifier and a sentence-transformers model around another."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    tok = _word_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=512)
    nli = root / "nli"
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    BertForSequenceClassification(BertConfig(**kw, num_labels=3, id2label=labels,
                                             label2id={v: k for k, v in labels.items()})).save_pretrained(nli)
    tok.save_pretrained(nli)
    bert = root / "bert"
    BertModel(BertConfig(**kw)).save_pretrained(bert)
    tok.save_pretrained(bert)
    st = root / "st"
    word = models.Transformer(str(bert), max_seq_length=128)
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension())]).save(str(st))
    return str(st), str(nli)


class GpuMemoryPoller:
    """Peak used GPU memory (MiB, whole device) seen by nvidia-smi while a variant runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, max(int(x) for x in out.split()))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def run_variant(name: str, method: str, extra: list[str], args, st: str, nli: str, work: Path) -> dict:
    sets = [f"experiment.training.method={method}", f"experiment.training.epochs={args.epochs}",
            "search.resources.use_gpu=true", f"experiment.eval.embedding_model={st}",
            f"experiment.eval.nli_model={nli}", f"experiment.training.output_dir={work / name}", *extra]
    if args.cpu_smoke:
        sets += ["search.resources.use_gpu=false", "experiment.eval.max_samples=8",
                 "experiment.eval.max_forget_samples=8"]
    cmd = [sys.executable, "-m", "raysweep.unlearn", "--config", str(REPO / "search_spaces/tiny.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + len(name)), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", PYTHONUNBUFFERED="1")
    if args.cpu_smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    started = time.perf_counter()
    with GpuMemoryPoller() as mem:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=args.variant_timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            partial = err.stdout or b""  # bytes even with text=True
            rc, stdout, stderr = 124, partial.decode() if isinstance(partial, bytes) else partial, "timeout"
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc}")
    if len(epochs) != args.epochs:
        problems.append(f"{len(epochs)} epoch reports, expected {args.epochs}")
    for row in epochs:
        keys = ["MU", "FE", "objective", "forget_quality"]
        keys += [k for k, model in (("forget/CS", st), ("forget/ES", nli)) if model != "null"]
        for key in keys:
            v = row.get(key)
            if v is None or not math.isfinite(v) or not 0 <= v <= 1:
                problems.append(f"epoch {row.get('epoch')}: {key}={v}")
    keep = ("epoch", "objective", "MU", "FE", "forget/R", "retain/R", "forget/CS", "forget/ES",
            "forget_quality", "train/loss", "train/zero_stage", "time/train_s", "time/eval_s")
    result = {
        "variant": name, "method": method, "settings": sets, "ok": not problems, "problems": problems,
        "wall_s": round(wall, 1), "peak_gpu_mib": mem.peak,
        "epochs": [{k: row[k] for k in keep if k in row} for row in epochs],
    }
    if name == "zero3" and rc == 0:
        ckpt = work / name / "final"
        result["checkpoint_files"] = sorted(p.name for p in ckpt.glob("*")) if ckpt.exists() else []
        if not any(p.endswith(".safetensors") for p in result["checkpoint_files"]):
            result["ok"] = False
            result["problems"].append("no gathered safetensors checkpoint")
    if not result["ok"]:
        result["stderr_tail"] = stderr[-4000:]
    return result


def throughput(args) -> dict:
    """Seconds per optimizer step of a 7B-width Llama under the worker's ZeRO-3 config."""
    import torch
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from raysweep.config import ExperimentConfig
    from raysweep.losses import LossParams, compute_loss, parse_method
    from raysweep.train import deepspeed_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29650", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    if gpu:
        torch.cuda.set_device(0)
    per_device, accum = 4, (2 if args.cpu_smoke else 8)  # effective batch 8 (smoke) or 32
    cfg = ExperimentConfig.model_validate({
        "training": {"method": "NPO+GD", "per_device_batch_size": per_device, "effective_batch_size": per_device * accum,
                     "deepspeed": {"zero_stage": 3, "offload_optimizer": "none", "gradient_checkpointing": True}}})
    ds_config = deepspeed_config(cfg, accum, use_gpu=gpu)
    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000) \
        if args.cpu_smoke else dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                    num_key_value_heads=32, vocab_size=32000)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **width)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init: weights born partitioned)
    started = time.perf_counter()
    dtype = torch.bfloat16 if gpu else torch.float32
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    setup_s = time.perf_counter() - started
    device = engine.device
    gen = torch.Generator().manual_seed(0)

    def pair(seq: int) -> dict:
        ids = torch.randint(10, config.vocab_size, (per_device, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 3] = -100  # the question part is masked, as in the worker's batches
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}

    method, params = parse_method("NPO+GD"), LossParams(beta=0.1)
    n_examples = per_device * accum * (args.steps + 1)
    ref = {"forget_nll": torch.rand(n_examples) * 50 + 20}  # sequence NLLs of a reference
    timings = []
    for step in range(args.steps + 1):  # the first step warms up (allocator, kernels)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in range(accum):
            batch = {"forget": pair(args.seq), "retain": pair(args.seq),
                     "index": torch.arange(per_device) + (step * accum + micro) * per_device}
            loss, _ = compute_loss(method, engine, batch, params, ref_logps=ref)
            engine.backward(loss)
            engine.step()
        if gpu:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)
    steady = timings[1:]
    step_s = sum(steady) / len(steady)
    tokens = per_device * accum * args.seq * 2  # forget + retain sequences per optimizer step
    # forward+backward with gradient checkpointing ~ 8 FLOPs per parameter per token
    tflops = 8 * n_params * tokens / step_s / 1e12
    return {
        "model": f"Llama-2-7B width, {args.layers} of 32 layers", "parameters": n_params,
        "method": "NPO+GD (forget + retain forward/backward; reference log-probs precomputed)",
        "per_device_batch": per_device, "grad_accum": accum, "seq_len": args.seq,
        "setup_s": round(setup_s, 1), "step_s": [round(t, 3) for t in timings],
        "mean_step_s_after_warmup": round(step_s, 3), "tokens_per_s": round(tokens / step_s),
        "approx_tflops": round(tflops, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
    }


# ----------------------------------------------------------------------------- old path vs new (issue #13)

# The new training configuration, in one place: the memory planner chooses the ZeRO stage,
# optimizer offload, gradient checkpointing and micro-batch; one forward per micro-step.
NEW_TRAINING = {
    "per_device_batch_size": "auto",
    "liger": True,  # switched off by the driver when liger_kernel is not installed (recorded)
    "deepspeed": {"zero_stage": "auto", "offload_optimizer": "auto", "gradient_checkpointing": "auto"},
}
OLD_TRAINING = {
    "per_device_batch_size": 4,
    "deepspeed": {"zero_stage": 3, "offload_optimizer": "none", "gradient_checkpointing": True},
}
PART_BUDGET_S = {"eval_old": 100, "eval_new": 180, "train_old": 90, "train_new": 90}  # 460 s, < 8 min in all
SMOKE_BUDGET_S = 60
SEQ_TOKENS = 256  # question + answer tokens of each training sequence (as part B)
TOFU_SIZES = {"forget": 400, "retain": 400, "real_authors": 100, "world_facts": 117}


def _bench_vocab(size: int) -> list[str]:
    return ["[PAD]", "[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(size - 4)]


def bench_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 w1 ...`` (no hub access on the GPU machine): one token a
    word, BOS ``<s>``, EOS ``</s>``, pad ``[PAD]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_bench_vocab(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def bench_model_config(layers: int, smoke: bool):
    from transformers import LlamaConfig

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=1000) if smoke else dict(hidden_size=4096, intermediate_size=11008,
                                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    # no pad_token_id: its zeroed embedding row breaks the init under zero.Init (the tokenizer pads)
    return LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=2, eos_token_id=3, **width)


def _words(rng, n: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(n))


def bench_records(n: int, rng, vocab_size: int, general: bool = False, q_words: int = 20, a_words: int = 20):
    from raysweep.data.records import QARecord

    out = []
    for _ in range(n):
        answer = _words(rng, a_words, vocab_size)
        out.append(QARecord(
            question=_words(rng, q_words, vocab_size), answer=answer,
            paraphrased_answer=_words(rng, a_words, vocab_size),
            perturbed_answer=tuple(_words(rng, a_words, vocab_size) for _ in range(3 if general else 5)),
            original_answer=answer + " " + _words(rng, 10, vocab_size) if general else None))
    return out


def _part_env() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29660"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")


def _peak_gib(gpu: bool) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None


def part_eval(path: str, smoke: bool) -> dict:
    """(a) one evaluation on the hooked (``old``) or the gathered (``new``) ZeRO-3 path."""
    import random

    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from raysweep.config import ExperimentConfig
    from raysweep.eval.evaluate import Evaluator
    from raysweep.scenarios import EvalSet
    from raysweep.train import deepspeed_config

    _part_env()
    gpu = torch.cuda.is_available() and not smoke
    if gpu:
        torch.cuda.set_device(0)
    layers = 2 if smoke else (32 if torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else 16)
    config = bench_model_config(layers, smoke)
    tokenizer = bench_tokenizer(config.vocab_size)
    rng = random.Random(0)
    sizes = {k: max(4, v // 50) for k, v in TOFU_SIZES.items()} if smoke else TOFU_SIZES
    sets = {name: EvalSet(name, bench_records(n, rng, config.vocab_size, general=name in ("real_authors", "world_facts")),
                          is_forget=name == "forget", style="general" if name in ("real_authors", "world_facts") else "tofu")
            for name, n in sizes.items()}
    holdout = bench_records(sizes["forget"], rng, config.vocab_size)
    slice_n = 4 if smoke else 16
    sliced = {name: EvalSet(name, sets[name].records[:slice_n], sets[name].is_forget, sets[name].style)
              for name in ("forget", "retain")}
    cfg = ExperimentConfig.model_validate({
        "training": {**OLD_TRAINING, "effective_batch_size": 4},
        "eval": {"batch_size": 16, "max_length": 200, "embedding_model": None, "nli_model": None,
                 "gather": "never" if path == "old" else "always"},
    })
    ds_config = deepspeed_config(cfg, 1, use_gpu=gpu)
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init: weights born partitioned)
    started = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16 if gpu else torch.float32):
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    setup_s = time.perf_counter() - started
    n_params = sum(p.ds_numel for p in engine.module.parameters())
    logs: list[str] = []

    def timed(eval_sets, batch_size, holdout_records):
        cfg.eval.batch_size = batch_size
        evaluator = Evaluator(cfg, eval_sets, device=engine.device, engine=engine, holdout=holdout_records,
                              log=logs.append)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            metrics, samples = evaluator(engine.module, tokenizer)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        questions = sum(len(s.records) for s in eval_sets.values())
        tokens = sum(len(tokenizer(r["generation"], add_special_tokens=False)["input_ids"])
                     for rows in samples.values() for r in rows)
        return {"questions": questions, "batch_size": batch_size, "seconds": round(seconds, 2),
                "s_per_question": round(seconds / questions, 4), "generated_tokens": tokens,
                "gathered": metrics.get("eval/gathered"), "peak_gib": _peak_gib(gpu),
                "objective_finite": math.isfinite(metrics["objective"])}

    name = "tiny Llama (CPU smoke)" if smoke else f"Llama-2-7B width, {layers} of 32 layers, random bf16 weights"
    out = {"part": f"eval_{path}", "model": name,
           "parameters": n_params, "setup_s": round(setup_s, 1), "zero_stage": 3, "world_size": 1}
    out["slice"] = timed(sliced, 16, holdout[:slice_n])
    if path == "old":
        full_q = sum(sizes.values())
        out["full_extrapolated_s"] = round(out["slice"]["s_per_question"] * full_q, 1)
        out["full_extrapolated_note"] = (f"slice of {out['slice']['questions']} questions scaled to {full_q}: "
                                         "NOT a measurement of the full evaluation")
    else:
        out["full"] = timed(sets, 64, holdout)
    out["log"] = logs
    return out


def part_train(path: str, smoke: bool) -> dict:
    """(b) training tokens/s through the worker itself, old or new configuration."""
    import random

    import torch
    from pydantic import ValidationError
    from transformers import LlamaForCausalLM

    from raysweep.config import ExperimentConfig
    from raysweep.data.formatting import encode_qa
    from raysweep.scenarios import Resolved, RunData
    from raysweep.train import run_unlearning

    _part_env()
    gpu = torch.cuda.is_available() and not smoke
    if gpu:
        torch.cuda.set_device(0)
    training = dict(OLD_TRAINING if path == "old" else NEW_TRAINING)
    if path == "new" and os.environ.get("RAYSWEEP_BENCH_NO_LIGER"):
        training["liger"] = False
    values = {"method": "NPO+GD", "epochs": 2, "effective_batch_size": 32, "lr": 1e-5, **training}
    try:
        cfg = ExperimentConfig.model_validate({"training": values, "data": {"max_length": SEQ_TOKENS + 8},
                                               "model": {"dtype": "bfloat16" if gpu else "float32"}})
    except ValidationError as err:
        first = err.errors()[0]
        return {"part": f"train_{path}", "config": training,
                "error": f"this branch's config rejects it ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                         "it needs the training half of issue #13"}
    layers = 2 if smoke else 16
    config = bench_model_config(layers, smoke)
    tokenizer = bench_tokenizer(config.vocab_size)
    rng = random.Random(1)
    n, q = (16, 20) if smoke else (64, 80)
    a = (SEQ_TOKENS if not smoke else 60) - q - 4  # + "Question:"/"Answer:" words, BOS and EOS
    forget = bench_records(n, rng, config.vocab_size, q_words=q, a_words=a)
    retain = bench_records(n, rng, config.vocab_size, q_words=q, a_words=a)
    seq = len(encode_qa(tokenizer, forget[0].question, forget[0].answer, cfg.model.prompt_template,
                        cfg.data.max_length)["input_ids"])
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if gpu else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    reports = []

    def no_evaluation(model, tokenizer):  # part (a) measures evaluation; here only training is timed
        return {}, {}

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    run_unlearning(cfg, reports.append, use_gpu=gpu, evaluator=no_evaluation,
                   resolved=Resolved(model="bench-random-llama", retain_model=None, data_dir=None),
                   data=RunData(forget, retain, ["I do not know."], {}), model=model, tokenizer=tokenizer)
    last = reports[-1].metrics
    tokens = 2 * n * seq  # every forget sequence and its retain partner, once an epoch
    train_s = last["time/train_s"]
    name = "tiny Llama (CPU smoke)" if smoke else f"Llama-2-7B width, {layers} of 32 layers"
    return {"part": f"train_{path}", "config": training, "model": name,
            "parameters": n_params, "seq_tokens": seq, "sequences_per_epoch": 2 * n,
            "epoch2_train_s": round(train_s, 2), "tokens_per_s": round(tokens / train_s),
            "zero_stage": last.get("train/zero_stage"), "optimizer_steps": last.get("train/optimizer_steps"),
            "peak_gib": _peak_gib(gpu), "train_loss_finite": math.isfinite(last["train/loss"])}


def matmul_tflops(smoke: bool) -> float | None:
    """The bf16 matmul rate of this GPU (8192³ products, 2 s): MFU's denominator."""
    import torch

    if smoke or not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        a @ b
        n += 1
    torch.cuda.synchronize()
    return round(2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12, 1)


def run_part(name: str, args) -> dict:
    budget = SMOKE_BUDGET_S if args.cpu_smoke else PART_BUDGET_S[name]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(args.out)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               MASTER_PORT=str(29660 + list(PART_BUDGET_S).index(name)), PYTHONUNBUFFERED="1")
    if args.cpu_smoke:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    if name == "train_new" and importlib.util.find_spec("liger_kernel") is None:
        env["RAYSWEEP_BENCH_NO_LIGER"] = "1"
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"part": name, "error": f"ran past its budget of {budget} s: no figure"}
    wall = round(time.perf_counter() - started, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{\"part\"")]
    if proc.returncode != 0 or not lines:
        return {"part": name, "error": f"exit code {proc.returncode}", "wall_s": wall, "stderr_tail": proc.stderr[-3000:]}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    if name == "train_new" and env.get("RAYSWEEP_BENCH_NO_LIGER"):
        result["note"] = "liger_kernel is not installed here: liger off"
    return result


def markdown(report: dict) -> str:
    parts = report["parts"]
    peak = report.get("matmul_tflops")

    def gib(p):
        return "—" if p.get("peak_gib") is None else f"{p['peak_gib']:.1f}"

    rows = ["| part | path | figure | peak memory (GiB) |", "| --- | --- | --- | ---: |"]
    for name in ("eval_old", "eval_new"):
        p = parts.get(name, {})
        if "error" in p:
            rows.append(f"| (a) evaluation | {name} | not measured: {p['error']} | — |")
            continue
        sl = p["slice"]
        rows.append(f"| (a) evaluation, slice of {sl['questions']} q, batch {sl['batch_size']} | {name} | "
                    f"{sl['seconds']:.1f} s ({sl['s_per_question']:.3f} s/question) | {gib(sl)} |")
        if "full" in p:
            f = p["full"]
            rows.append(f"| (a) full evaluation, {f['questions']} q, batch {f['batch_size']} | {name} | "
                        f"{f['seconds']:.1f} s measured | {gib(f)} |")
        else:
            rows.append(f"| (a) full evaluation | {name} | {p['full_extrapolated_s']:.0f} s extrapolated from the "
                        "slice (not measured) | — |")
    for name in ("train_old", "train_new"):
        p = parts.get(name, {})
        if "error" in p:
            rows.append(f"| (b) training | {name} | not measured: {p['error']} | — |")
            continue
        mfu = f", MFU {100 * 6 * p['parameters'] * p['tokens_per_s'] / (peak * 1e12):.1f} %" if peak else ""
        rows.append(f"| (b) training, {p['model']} | {name} | {p['tokens_per_s']} tokens/s{mfu} "
                    f"(ZeRO stage {p['zero_stage']}) | {gib(p)} |")
    return "\n".join(rows)


def old_vs_new(args) -> int:
    report = {"environment": environment(), "matmul_tflops": matmul_tflops(args.cpu_smoke),
              "new_training": NEW_TRAINING, "old_training": OLD_TRAINING, "budgets_s": PART_BUDGET_S, "parts": {}}
    path = args.out / ("gpu_check_old_vs_new_cpu_smoke.json" if args.cpu_smoke else "gpu_check_old_vs_new.json")
    for name in PART_BUDGET_S:
        report["parts"][name] = run_part(name, args)
        print(json.dumps({k: v for k, v in report["parts"][name].items() if k not in ("stderr_tail", "log")}), flush=True)
        path.write_text(json.dumps(report, indent=1))
    old, new = report["parts"]["eval_old"], report["parts"]["eval_new"]
    if "error" not in old and "error" not in new:
        report["eval_speedup_same_slice"] = round(old["slice"]["seconds"] / new["slice"]["seconds"], 2)
    table = markdown(report)
    report["markdown"] = table
    path.write_text(json.dumps(report, indent=1))
    print(table)
    return 0 if all("error" not in p for p in report["parts"].values()) else 1


def environment() -> dict:
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variant-timeout", type=int, default=240)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks this script")
    parser.add_argument("--old-vs-new", action="store_true", help="issue #13: old vs new evaluation and training")
    parser.add_argument("--part", choices=list(PART_BUDGET_S), help=argparse.SUPPRESS)  # one part, in its own process
    args = parser.parse_args()
    if args.part:
        kind, path = args.part.split("_")
        result = (part_eval if kind == "eval" else part_train)(path, args.cpu_smoke)
        print(json.dumps(result), flush=True)
        return 0
    if args.old_vs_new:
        args.out.mkdir(parents=True, exist_ok=True)
        return old_vs_new(args)
    if args.cpu_smoke:
        args.layers = min(args.layers, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "variants": []}
    path = args.out / "gpu_check.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    save()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            st, nli = build_tiny_semantic_models(work / "semantic")
        except Exception as err:  # recorded: CS/ES then go unchecked, the worker variants still run
            report["semantic_models_error"] = f"{type(err).__name__}: {err}"
            st = nli = "null"
        for name in args.variants:
            method, extra = VARIANTS[name]
            result = run_variant(name, method, extra, args, st, nli, work)
            report["variants"].append(result)
            print(json.dumps({k: result[k] for k in ("variant", "ok", "problems", "wall_s", "peak_gpu_mib")}), flush=True)
            save()
    if not args.skip_throughput:
        try:
            report["throughput"] = throughput(args)
        except Exception as err:  # recorded, not hidden: the report says what failed
            report["throughput"] = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(report["throughput"]), flush=True)
        save()
    ok = all(v["ok"] for v in report["variants"]) and "error" not in report.get("throughput", {})
    print("GPU check:", "passed" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
