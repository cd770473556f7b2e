"""Build (once) and cache the embedded default: synthetic data + tiny target and retain models.

``python -m raysweep.prepare [--cache DIR] [--n-authors N ...] [--model-lr X ...] [--force]``

Everything is deterministic from the two specs (:class:`~raysweep.data.synthetic.SyntheticSpec`,
:class:`~raysweep.models.TinyModelSpec`): the cache entry is keyed by a short hash of both specs'
JSON and :data:`FORMAT_VERSION`.  Layout of one entry::

    <cache>/embedded-<key>/
        data/           the synthetic splits in the seed JSONL layout (forget10.json, ...)
        target/         HF model + tokenizer trained on corpus.pretrain_target (all fictitious QA)
        retain/         HF model + tokenizer trained on corpus.pretrain_retain (forget10 left out)
        specs.json      both specs
        meta.json       build statistics (written last; the entry is complete when it exists)

Concurrent callers (several Ray trials starting at once) are serialised by a file lock; the entry
is built in a temporary directory and published by an atomic rename, so a reader never sees a
half-written entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from raysweep.data.formatting import IGNORE_INDEX, encode_prompt, encode_qa, format_answer, format_prompt, pad_batch
from raysweep.data.records import QARecord
from raysweep.eval.metrics import rouge_l_recall
from raysweep.models import TinyModelSpec, build_tiny_model, count_parameters, load_tokenizer, train_tokenizer

from raysweep.data.templates import PRIOR_TEMPLATES

FORMAT_VERSION = 1
_PRIOR_ANSWERS = frozenset(PRIOR_TEMPLATES)
CACHE_ENV = "RAYSWEEP_CACHE"

Log = Callable[[str], Any]  # may also have .progress(name, step, total): see _ProgressLog


class _ProgressLog:
    """The build's ``log`` plus one tqdm bar per model being trained (steps done of the most
    ``max_epochs`` allow, with its ETA; the stop rule usually ends training earlier, so the ETA is
    an upper bound). :func:`train_model` calls ``log.progress`` after each optimizer step when the
    log has it; log lines are written around the bars."""

    def __init__(self, log: Log):
        self._log = log
        self._bars: dict[str, Any] = {}

    def __call__(self, msg: str) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode():
            self._log(msg)

    def progress(self, name: str, step: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(name)
        if bar is None:
            # Into a file or a pipe (CI, nohup, a log) every redraw is a new line: one a minute there.
            interactive = sys.stderr.isatty()
            bar = self._bars[name] = tqdm(total=total, desc=f"[prepare] {name}", unit="step",
                                          position=len(self._bars), dynamic_ncols=True,
                                          mininterval=0.1 if interactive else 60)
        bar.update(step - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


@dataclass(frozen=True)
class EmbeddedArtifacts:
    """Paths of one built embedded setup (``target_dir``/``retain_dir`` hold model + tokenizer)."""

    root: Path
    data_dir: Path
    target_dir: Path
    retain_dir: Path
    stats: dict = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$RAYSWEEP_CACHE`` if set, else ``~/.cache/raysweep``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/raysweep").expanduser()


def cache_key(synthetic, model: TinyModelSpec) -> str:
    """12 hex digits identifying the (synthetic spec, model spec, format version) triple."""
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "synthetic": synthetic.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def available_cpus() -> int:
    """CPUs this process may run on (affinity / container aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _artifacts(root: Path) -> EmbeddedArtifacts:
    stats = json.loads((root / "meta.json").read_text())
    return EmbeddedArtifacts(root, root / "data", root / "target", root / "retain", stats)


def _complete(root: Path) -> bool:
    return (root / "meta.json").is_file()


def ensure_embedded(
    synthetic=None,
    model: TinyModelSpec | None = None,
    cache_dir: str | Path | None = None,
    log: Log = print,
    force: bool = False,
    workers: int | None = None,
) -> EmbeddedArtifacts:
    """Return the cached embedded setup for these specs, building it first if needed.

    ``synthetic``/``model`` default to ``SyntheticSpec()``/``TinyModelSpec()``; ``cache_dir``
    defaults to :func:`default_cache_dir`.  ``force`` rebuilds an existing entry.  ``workers``:
    processes training the target and retain models (default 2 when there are >= 2 CPUs, the
    threads split between them; 1 = both in this process, one after the other).
    """
    from filelock import FileLock

    from raysweep.data.synthetic import SyntheticSpec

    synthetic = synthetic if synthetic is not None else SyntheticSpec()
    model = model if model is not None else TinyModelSpec()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(synthetic, model)
    root = cache / f"embedded-{key}"
    if _complete(root) and not force:
        return _artifacts(root)
    with FileLock(str(cache / f".embedded-{key}.lock")):
        if _complete(root):
            if not force:
                return _artifacts(root)
            shutil.rmtree(root)
        elif root.exists():  # leftover from an interrupted publish: never complete, rebuild
            shutil.rmtree(root)
        for stale in cache.glob(f".embedded-{key}-*"):  # temp dirs of killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".embedded-{key}-", dir=cache))
        try:
            log(f"[prepare] building embedded setup {key} in {root}")
            _build(tmp, key, synthetic, model, log, workers)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _artifacts(root)


def _build(out: Path, key: str, synthetic, spec: TinyModelSpec, log: Log, workers: int | None) -> None:
    from raysweep.data.loaders import write_local_splits
    from raysweep.data.synthetic import generate

    t0 = time.perf_counter()
    corpus = generate(synthetic)
    write_local_splits(corpus.splits, out / "data")
    (out / "specs.json").write_text(
        json.dumps(
            {"format": FORMAT_VERSION, "synthetic": synthetic.model_dump(mode="json"),
             "model": spec.model_dump(mode="json")},
            indent=2,
        )
    )
    texts = [format_prompt(r.question, spec.template) + format_answer(r.answer, spec.template)
             for r in corpus.pretrain_target]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    log(f"[prepare] data: {len(corpus.pretrain_target)} target / {len(corpus.pretrain_retain)} retain QA pairs, "
        f"tokenizer {len(tokenizer)} tokens")

    forget10 = corpus.splits.get("forget10", [])
    forget_task1 = [r for r in forget10 if r.task_id == 1] or forget10
    jobs = {"target": corpus.pretrain_target, "retain": corpus.pretrain_retain}
    n_cpu = available_cpus()
    workers = workers if workers is not None else (2 if n_cpu >= 2 else 1)
    stats: dict[str, Any] = {"key": key, "format": FORMAT_VERSION, "vocab_size": len(tokenizer),
                             "n_pretrain_target": len(corpus.pretrain_target),
                             "n_pretrain_retain": len(corpus.pretrain_retain),
                             "n_forget10_task1": len(forget_task1), "workers": min(workers, len(jobs))}
    bars = _ProgressLog(log)
    try:
        if workers <= 1:
            for name, records in jobs.items():
                stats[name] = _train_job(spec, str(tok_dir), records, forget_task1, str(out / name), name, n_cpu, bars)
        else:
            stats.update(_train_parallel(spec, str(tok_dir), jobs, forget_task1, out, max(1, n_cpu // len(jobs)),
                                         bars))
    finally:
        bars.close()
    shutil.rmtree(tok_dir)
    for name in jobs:
        s = stats[name]
        log(f"[prepare] {name}: {s['epochs']} epochs in {s['train_seconds']:.0f} s "
            f"({s['cpu_seconds']:.0f} CPU s, {s['tokens_per_s']:.0f} tok/s, {s['threads']} thread(s)), "
            f"loss {s['final_loss']:.4f}, "
            f"ROUGE-L recall on training QA {s['recall_train']:.3f} (rejection prior {_fmt(s['recall_prior'])}), "
            f"forget10 task 1 {s['recall_forget10_task1']:.3f}")
    stats["params"] = stats["target"]["params"]
    stats["build_seconds"] = time.perf_counter() - t0
    (out / "meta.json").write_text(json.dumps(stats, indent=2))


def _train_job(spec: TinyModelSpec, tok_dir: str, records: Sequence[QARecord], forget_task1: Sequence[QARecord],
               out_dir: str, name: str, threads: int, log: Log) -> dict:
    """Train one model (``train_model``, looked up at call time), save it with the tokenizer into
    ``out_dir`` and evaluate it; returns its stats.

    The stop rule and ``recall_train`` use the factual training QA (fictitious authors + general
    knowledge); the rejection-prior pairs (answers drawn at random from ``PRIOR_TEMPLATES``, so
    which rejection a question gets is noise, not knowledge) are scored apart as
    ``recall_prior``."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = load_tokenizer(tok_dir)
        factual = [r for r in records if r.answer not in _PRIOR_ANSWERS]
        prior = [r for r in records if r.answer in _PRIOR_ANSWERS]
        model, stats = train_model(spec, tokenizer, records, log=log, name=name, check_records=factual or None)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        kw = dict(template=spec.template, batch_size=spec.eval_batch_size, max_new_tokens=spec.max_new_tokens)
        if stats.get("check_covers_all") and factual:
            stats["recall_train"] = stats["recall_check"]
        else:
            stats["recall_train"] = greedy_recall(model, tokenizer, factual or records, **kw)[0]
        stats["recall_prior"] = greedy_recall(model, tokenizer, prior, **kw)[0] if prior else None
        stats["recall_forget10_task1"] = greedy_recall(model, tokenizer, forget_task1, **kw)[0]
        stats["threads"] = threads
        return stats
    finally:
        torch.set_num_threads(old_threads)


_LOG_PREFIX = "@@raysweep-log "
_PROGRESS_PREFIX = "@@raysweep-progress "  # + "<name> <step> <total>"


class _ChildLog:
    """The log of a training subprocess: lines (and progress) to stdout, for :func:`_train_parallel`."""

    def __call__(self, msg: str) -> None:
        print(_LOG_PREFIX + msg.replace("\n", " "), flush=True)

    def progress(self, name: str, step: int, total: int) -> None:
        print(f"{_PROGRESS_PREFIX}{name} {step} {total}", flush=True)


def _worker_main(job_file: str) -> None:
    """Entry point of a training subprocess: ``_train_job`` on the pickled arguments in
    ``job_file``; log lines go to stdout behind ``_LOG_PREFIX``, the stats to ``<job_file>.json``."""
    import pickle

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with open(job_file, "rb") as f:
        kwargs = pickle.load(f)

    stats = _train_job(**kwargs, log=_ChildLog())
    Path(job_file + ".json").write_text(json.dumps(stats))


def _train_parallel(spec: TinyModelSpec, tok_dir: str, jobs: dict[str, Sequence[QARecord]],
                    forget_task1: Sequence[QARecord], out: Path, threads: int, log: Log) -> dict[str, dict]:
    """Train the models of ``jobs`` at once, one Python subprocess each with ``threads`` torch
    threads: on a few CPU cores two single-threaded trainings beat two sequential two-thread
    ones.  Plain subprocesses (not multiprocessing) so the caller's ``__main__`` is never re-run."""
    import collections
    import pickle
    import queue as queue_mod
    import subprocess
    import threading

    import raysweep

    env = dict(os.environ)
    pkg_root = str(Path(raysweep.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    lines: queue_mod.Queue = queue_mod.Queue()
    tails: dict[str, collections.deque] = {}
    procs: dict[str, subprocess.Popen] = {}
    job_files: dict[str, str] = {}
    readers: dict[str, threading.Thread] = {}

    def reader(name: str, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if line.startswith(_LOG_PREFIX):
                lines.put(line[len(_LOG_PREFIX):])
            elif line.startswith(_PROGRESS_PREFIX):
                job, step, total = line[len(_PROGRESS_PREFIX):].rsplit(" ", 2)
                lines.put((job, int(step), int(total)))
            else:
                tails[name].append(line)
        stream.close()

    def emit(item) -> None:  # a log line, or a (name, step, total) progress update
        if isinstance(item, str):
            log(item)
        elif hasattr(log, "progress"):
            log.progress(*item)

    try:
        for name, records in jobs.items():
            job_file = str(out / f".job-{name}.pkl")
            with open(job_file, "wb") as f:
                pickle.dump(dict(spec=spec, tok_dir=tok_dir, records=list(records), forget_task1=list(forget_task1),
                                 out_dir=str(out / name), name=name, threads=threads), f)
            job_files[name] = job_file
            tails[name] = collections.deque(maxlen=40)
            procs[name] = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from raysweep.prepare import _worker_main; _worker_main(sys.argv[1])", job_file],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env,
            )
            readers[name] = threading.Thread(target=reader, args=(name, procs[name].stdout), daemon=True)
            readers[name].start()
        while any(p.poll() is None for p in procs.values()) or not lines.empty():
            try:
                emit(lines.get(timeout=0.5))
            except queue_mod.Empty:
                pass
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                n = failed[0]
                readers[n].join(timeout=5)
                raise RuntimeError(f"training the {n} model failed (exit code {procs[n].returncode}):\n"
                                   + "\n".join(tails[n]))
        for t in readers.values():
            t.join(timeout=5)
        while not lines.empty():
            emit(lines.get())
        results = {}
        for name in jobs:
            results[name] = json.loads(Path(job_files[name] + ".json").read_text())
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for job_file in job_files.values():
            for path in (job_file, job_file + ".json"):
                if os.path.exists(path):
                    os.remove(path)


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def greedy_generate(model, tokenizer, questions: Sequence[str], template: str = "plain", batch_size: int = 64,
                    max_new_tokens: int = 96) -> list[str]:
    """Greedy answers to ``questions`` (``raysweep.eval.generation.generate_batched`` on the
    prompts' token ids, ``max_new_tokens`` each), stripped."""
    from raysweep.eval.generation import generate_batched

    prompts = [encode_prompt(tokenizer, q, template) for q in questions]
    if not prompts:
        return []
    return [text.strip() for text in generate_batched(model, tokenizer, prompts, batch_size,
                                                       max_new_tokens=max_new_tokens)]


def greedy_recall(model, tokenizer, records: Sequence[QARecord], template: str = "plain", batch_size: int = 64,
                  max_new_tokens: int = 96) -> tuple[float, list[float]]:
    """Mean and per-record ROUGE-L recall of greedy answers against ``record.answer``."""
    if not records:
        return float("nan"), []
    gens = greedy_generate(model, tokenizer, [r.question for r in records], template, batch_size, max_new_tokens)
    scores = [rouge_l_recall(g, r.answer) for r, g in zip(records, gens)]
    return sum(scores) / len(scores), scores


# --------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, spec: TinyModelSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    if spec.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


def _batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices; lengths are bucketed (sorted within chunks of 16 batches) to
    cut padding."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    chunk = batch_size * 16
    batches = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: len(examples[i]["input_ids"]))
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def train_model(spec: TinyModelSpec, tokenizer, records: Sequence[QARecord], log: Log = print,
                name: str = "model", check_records: Sequence[QARecord] | None = None):
    """Train a fresh tiny model on ``records`` (QA pairs, ``spec.template``) until the stop rule.

    Loss: cross-entropy on the answer tokens + EOS, plus ``spec.prompt_loss_weight`` times the
    question tokens'.  Returns ``(model, stats)``; stats: epochs, steps, train_seconds, tokens,
    tokens_per_s, final_loss, recall_check (greedy ROUGE-L recall of the last stop-rule check, on
    up to ``spec.eval_samples`` pairs of ``check_records``, default ``records``), check_covers_all
    (that check used every pair and the final weights), params.  Uses the caller's
    ``torch.get_num_threads()``.
    """
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    model = build_tiny_model(spec, tokenizer)
    model.train()
    examples = [encode_qa(tokenizer, r.question, r.answer, spec.template, spec.max_length) for r in records]
    pool = list(check_records) if check_records is not None else list(records)
    check_idx = sorted(random.Random(spec.seed + 1).sample(range(len(pool)), min(spec.eval_samples, len(pool))))
    check_set = [pool[i] for i in check_idx]

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=spec.betas,
    )
    steps_per_epoch = math.ceil(len(examples) / spec.batch_size)
    total_steps = steps_per_epoch * spec.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, spec))
    pad_id = tokenizer.pad_token_id
    progress = getattr(log, "progress", None)  # a progress bar (_ProgressLog / _ChildLog)

    t0 = time.perf_counter()
    c0 = time.process_time()
    train_time = 0.0
    step, tokens, epoch = 0, 0, 0
    recall, recall_epoch = None, 0
    loss_ema = None
    for epoch in range(1, spec.max_epochs + 1):
        te = time.perf_counter()
        ep_loss, ep_n = 0.0, 0
        for b in _batches(examples, spec.batch_size, rng):
            batch = pad_batch([examples[i] for i in b], pad_id, side="right")
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:]
            answer = labels[:, 1:] != IGNORE_INDEX
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="none").view_as(tgt)
            if spec.prompt_loss_weight > 0:
                w = answer.float() + spec.prompt_loss_weight * ((~answer) & (mask[:, 1:] == 1)).float()
            else:
                w = answer.float()
            loss = (ce * w).sum() / w.sum().clamp_min(1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress(name, step, total_steps)
            tokens += int(mask.sum())
            ep_loss += loss.detach().item() * len(b)
            ep_n += len(b)
        train_time += time.perf_counter() - te
        ep_loss /= max(1, ep_n)
        loss_ema = ep_loss
        elapsed = time.perf_counter() - t0
        msg = f"[prepare] {name} epoch {epoch}: loss {ep_loss:.4f}, lr {sched.get_last_lr()[0]:.2e}, {elapsed:.0f} s"
        out_of_time = spec.time_budget_s is not None and elapsed >= spec.time_budget_s
        if epoch >= spec.min_epochs and (epoch % spec.eval_every == 0 or epoch == spec.max_epochs or out_of_time):
            recall = greedy_recall(model, tokenizer, check_set, spec.template, spec.eval_batch_size,
                                   spec.max_new_tokens)[0]
            recall_epoch = epoch
            msg += f", greedy ROUGE-L recall {recall:.3f}"
            log(msg)
            if recall >= spec.stop_recall:
                break
        else:
            log(msg)
        if out_of_time:
            log(f"[prepare] {name}: time budget {spec.time_budget_s} s spent")
            break
    model.eval()
    stats = {
        "epochs": epoch,
        "steps": step,
        "train_seconds": train_time,
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "tokens": tokens,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "final_loss": loss_ema,
        "recall_check": recall,
        "check_covers_all": recall is not None and recall_epoch == epoch and len(check_set) == len(pool),
        "threads": torch.get_num_threads(),
        "params": count_parameters(model),
    }
    return model, stats


# --------------------------------------------------------------------------- CLI


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _simple_type(annotation) -> type | None:
    """int/float/str/bool for a field annotation (Optional allowed), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, str, bool) else None


def _add_spec_args(parser: argparse.ArgumentParser, spec_cls, prefix: str, dest_prefix: str) -> None:
    for fname, finfo in spec_cls.model_fields.items():
        kind = _simple_type(finfo.annotation)
        if kind is None:
            continue
        flag = f"--{prefix}{fname.replace('_', '-')}"
        default = finfo.default
        help_text = f"{finfo.description + '; ' if finfo.description else ''}default {default!r}"
        if kind is bool:
            parser.add_argument(flag, dest=dest_prefix + fname, type=lambda s: s.lower() in ("1", "true", "yes"),
                                default=None, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, dest=dest_prefix + fname, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)


def main(argv: Sequence[str] | None = None) -> int:
    from raysweep.data.synthetic import SyntheticSpec

    argv = list(sys.argv[1:] if argv is None else argv)
    which = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    which.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    chosen, rest = which.parse_known_args(argv)
    if chosen.model == "smollm2":  # the real-model default (raysweep.smollm2) has its own flags
        from raysweep.smollm2 import main as smollm2_main

        return smollm2_main(rest)

    parser = argparse.ArgumentParser(
        prog="python -m raysweep.prepare",
        description="Build (or reuse) the embedded default: synthetic fictitious-authors data and the tiny "
                    "target/retain models. Synthetic settings: --<field>; model settings: --model-<field>.",
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="tiny: the embedded default (these flags); smollm2: the real-model default, "
                             "SmolLM2-135M-Instruct fine-tuned on TOFU (see --model smollm2 --help)")
    parser.add_argument("--cache", default=None, help=f"cache directory (default ${CACHE_ENV} or ~/.cache/raysweep)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    _add_spec_args(parser, SyntheticSpec, "", "syn__")
    _add_spec_args(parser, TinyModelSpec, "model-", "mod__")
    args = vars(parser.parse_args(argv))
    from pydantic import ValidationError

    from raysweep.config import fail

    specs = {}
    for dest, spec_cls, flag_prefix in (("syn__", SyntheticSpec, "--"), ("mod__", TinyModelSpec, "--model-")):
        try:
            specs[dest] = spec_cls(**{k[5:]: v for k, v in args.items() if k.startswith(dest) and v is not None})
        except ValidationError as err:  # a bad value: one line naming the flag, exit 2 (not a traceback)
            first = err.errors()[0]
            field = str(first["loc"][0]) if first.get("loc") else ""
            fail(flag_prefix + field.replace("_", "-") if field else "python -m raysweep.prepare", "", first["msg"])
    syn, mod = specs["syn__"], specs["mod__"]
    t0 = time.perf_counter()
    art = ensure_embedded(syn, mod, cache_dir=args["cache"], force=args["force"])
    wall = time.perf_counter() - t0
    st = art.stats
    print(f"embedded setup: {art.root}")
    print(f"  data:   {art.data_dir}")
    print(f"  target: {art.target_dir}")
    print(f"  retain: {art.retain_dir}")
    print(f"  params: {st.get('params')}")
    print(f"  build time: {st.get('build_seconds', float('nan')):.0f} s (this call: {wall:.1f} s)")
    for name in ("target", "retain"):
        s = st.get(name, {})
        print(f"  {name}: ROUGE-L recall on training QA {_fmt(s.get('recall_train'))} "
              f"(rejection prior {_fmt(s.get('recall_prior'))}), "
              f"on forget10 task 1 {_fmt(s.get('recall_forget10_task1'))}, "
              f"{s.get('epochs')} epochs, {s.get('train_seconds', float('nan')):.0f} s "
              f"({s.get('cpu_seconds', float('nan')):.0f} CPU s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
