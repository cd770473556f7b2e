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
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
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
