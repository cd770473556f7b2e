"""The embedded setup: cache key, layout, statistics, reuse, atomic publish, CLI."""

import json
import time
from pathlib import Path

import pytest
import torch

import raysweep.prepare as prepare
from raysweep.data.loaders import load_local_split
from raysweep.models import load_model, load_tokenizer
from raysweep.eval.metrics import rouge_l_recall
from raysweep.prepare import cache_key, default_cache_dir, ensure_embedded, greedy_recall

SEED_SPLITS = ("forget01", "forget05", "forget10", "forget01_perturbed", "forget05_perturbed",
               "forget10_perturbed", "retain90", "retain95", "retain99", "retain_perturbed",
               "real_authors_perturbed", "world_facts_perturbed", "holdout", "holdout_perturbed")


def test_cache_key_stable_and_spec_sensitive(embedded_specs):
    syn, mod = embedded_specs.synthetic, embedded_specs.model
    key = cache_key(syn, mod)
    assert key == cache_key(syn.model_copy(), mod.model_copy()) and len(key) == 12
    assert cache_key(syn.model_copy(update={"seed": 1}), mod) != key
    assert cache_key(syn, mod.model_copy(update={"lr": 1e-3})) != key
    assert cache_key(syn, mod.model_copy(update={"hidden_size": 128})) != key


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RAYSWEEP_CACHE")
    assert default_cache_dir() == Path("~/.cache/raysweep").expanduser()


def test_session_cache_is_temporary(embedded, embedded_specs, raysweep_cache):
    key = cache_key(embedded_specs.synthetic, embedded_specs.model)
    assert embedded.root == Path(raysweep_cache) / f"embedded-{key}"
    assert embedded.stats["key"] == key


def test_layout(embedded, embedded_specs):
    for split in SEED_SPLITS:
        assert (embedded.data_dir / f"{split}.json").is_file(), split
    forget = load_local_split(embedded.data_dir, "forget10")
    assert forget and all(r.task_id is not None for r in forget)
    specs = json.loads((embedded.root / "specs.json").read_text())
    assert specs["synthetic"] == embedded_specs.synthetic.model_dump(mode="json")
    assert specs["model"] == embedded_specs.model.model_dump(mode="json")
    assert not [p for p in embedded.root.parent.iterdir()
                if p.name.startswith(".embedded-") and not p.name.endswith(".lock")]  # no temp left


def test_models_load_and_share_tokenizer(embedded, embedded_specs):
    tok_t, tok_r = load_tokenizer(str(embedded.target_dir)), load_tokenizer(str(embedded.retain_dir))
    assert tok_t.get_vocab() == tok_r.get_vocab()
    target, retain = load_model(str(embedded.target_dir)), load_model(str(embedded.retain_dir))
    assert target.dtype == torch.float32
    assert target.config.hidden_size == embedded_specs.model.hidden_size
    assert target.config.vocab_size == len(tok_t) == embedded.stats["vocab_size"]
    assert not torch.equal(target.model.embed_tokens.weight, retain.model.embed_tokens.weight)


def test_stats_recorded(embedded):
    stats = json.loads((embedded.root / "meta.json").read_text())
    assert stats == embedded.stats
    assert stats["params"] > 0 and stats["build_seconds"] > 0
    for name in ("target", "retain"):
        s = stats[name]
        for key in ("train_seconds", "tokens_per_s", "final_loss", "recall_train",
                    "recall_prior", "recall_forget10_task1", "epochs", "params", "cpu_seconds"):
            assert key in s, (name, key)
        assert s["tokens_per_s"] > 0 and s["final_loss"] < 1.0


def test_target_memorizes_and_retain_does_not_know_forget(embedded):
    target, retain = embedded.stats["target"], embedded.stats["retain"]
    assert target["recall_train"] >= 0.8
    assert target["recall_forget10_task1"] >= 0.8
    assert retain["recall_train"] >= 0.8
    # the retain model never saw forget10 task 1: it knows the answer templates, not the facts
    assert retain["recall_forget10_task1"] < target["recall_forget10_task1"] - 0.1


def test_recall_reproducible_from_saved_model(embedded, embedded_specs):
    model, tok = load_model(str(embedded.target_dir)), load_tokenizer(str(embedded.target_dir))
    forget = load_local_split(embedded.data_dir, "forget10", task_ids=[1])
    spec = embedded_specs.model
    mean, scores = greedy_recall(model, tok, forget, spec.template, batch_size=spec.eval_batch_size,
                                 max_new_tokens=spec.max_new_tokens)
    assert len(scores) == len(forget)
    assert mean == pytest.approx(embedded.stats["target"]["recall_forget10_task1"], abs=1e-6)


def test_second_call_reuses_cache(embedded, embedded_specs, raysweep_cache, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(prepare, "train_model", boom)
    # no timing assert (benchmarks measure time): the patched trainer proves nothing was rebuilt
    again = ensure_embedded(embedded_specs.synthetic, embedded_specs.model)  # via RAYSWEEP_CACHE
    assert again.root == embedded.root and again.stats == embedded.stats


def test_failed_build_publishes_nothing(embedded_specs, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("training exploded")

    monkeypatch.setattr(prepare, "train_model", boom)
    key = cache_key(embedded_specs.synthetic, embedded_specs.model)
    (tmp_path / f".embedded-{key}-killed").mkdir()  # temp dir of a killed build: cleaned up
    (tmp_path / f"embedded-{key}").mkdir()  # incomplete entry (no meta.json): rebuilt
    with pytest.raises(RuntimeError, match="exploded"):
        ensure_embedded(embedded_specs.synthetic, embedded_specs.model, cache_dir=tmp_path, log=lambda m: None,
                        workers=1)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # neither the entry nor its temp dir


def test_cli_reuses_cache(embedded, embedded_specs, raysweep_cache, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "train_model", lambda *a, **k: pytest.fail("retrained"))
    argv = ["--cache", raysweep_cache]
    for prefix, spec in (("", embedded_specs.synthetic), ("model-", embedded_specs.model)):
        default = type(spec)()
        for name, value in spec.model_dump().items():
            if value != getattr(default, name):
                argv += [f"--{prefix}{name.replace('_', '-')}", str(value)]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    assert str(embedded.root) in out and "ROUGE-L recall" in out


def test_rouge_l_recall():
    assert rouge_l_recall("Kalo Mira was born in Oslo, Norway.", "Kalo Mira was born in Oslo, Norway.") == 1.0
    assert rouge_l_recall("", "Kalo Mira was born in Oslo.") == 0.0  # (generation, reference)
    assert 0.5 < rouge_l_recall("Kalo Mira was born in Lima.", "Kalo Mira was born in Oslo.") < 1.0


def test_parallel_training_failure_is_reported(embedded_specs, tmp_path):
    from raysweep.data.records import QARecord

    records = [QARecord(question="Who?", answer="Nobody.")]
    with pytest.raises(RuntimeError, match="training the target model failed"):
        prepare._train_parallel(embedded_specs.model, str(tmp_path / "no-tokenizer"), {"target": records},
                                records, tmp_path, threads=1, log=lambda m: None)
    assert not list(tmp_path.glob(".job-*"))  # job files cleaned up


def test_concurrent_callers_build_once(embedded_specs, tmp_path, monkeypatch):
    """Two callers racing on one cache entry: one builds (under the file lock), the other waits and
    reuses it."""
    import threading

    from raysweep.models import build_tiny_model, count_parameters

    calls = []

    def fake_train(spec, tokenizer, records, log=print, name="model", check_records=None):
        calls.append(name)
        time.sleep(0.5)
        model = build_tiny_model(spec, tokenizer)
        return model, {"epochs": 0, "steps": 0, "train_seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0,
                       "tokens_per_s": 1.0, "final_loss": 9.9, "recall_check": 0.0, "check_covers_all": True,
                       "threads": 1, "params": count_parameters(model)}

    monkeypatch.setattr(prepare, "train_model", fake_train)
    small = embedded_specs.model.model_copy(update={"max_new_tokens": 4})
    results, errors = [], []

    def call():
        try:
            results.append(ensure_embedded(embedded_specs.synthetic, small, cache_dir=tmp_path, log=lambda m: None,
                                           workers=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(calls) == ["retain", "target"]  # built once
    assert results[0].root == results[1].root and (results[0].root / "meta.json").is_file()
    assert load_model(str(results[0].target_dir)).config.hidden_size == small.hidden_size
