"""Downstream tasks through lm-eval (raysweep.eval.downstream), offline.

A tiny random Llama + a WordLevel tokenizer are evaluated on local custom lm-eval tasks the test
writes into tmp_path (``dataset_path: json`` over a JSONL file: no hub access): a 4-option
multiple-choice task, a ``generate_until`` task with a filter, and a group aggregating two
multiple-choice tasks.  A model rigged to prefer the token of the right answer must score 1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from raysweep.eval.downstream import (  # noqa: E402
    DEFAULT_METRICS,
    DEFAULT_TASKS,
    DownstreamConfig,
    DownstreamError,
    DownstreamMetricError,
    run_downstream,
)

WORDS = ("question what is the colour of sky grass snow coal answer "
         "right wrong maybe never blue green white black").split()
OPTIONS = ["right", "wrong", "maybe", "never"]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 2,
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


@pytest.fixture()
def model(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config(tokenizer))


def _rigged_model(tokenizer):
    """A Llama whose logits get +50 on the token "right": it always prefers the right option."""
    from transformers import LlamaForCausalLM

    class Rigged(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + self.logit_bias.to(out.logits.dtype)
            return out

    torch.manual_seed(0)
    m = Rigged(_llama_config(tokenizer))
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.convert_tokens_to_ids("right")] = 50.0
    m.register_buffer("logit_bias", bias, persistent=False)
    return m


MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{prefix}question {{{{q}}}} answer"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "question {{{{q}}}} answer"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""

GROUP_YAML = """group: toy_group
task:
  - toy_mc_a
  - toy_mc_b
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Custom lm-eval tasks over 8 local JSONL docs; the right answer ("right") sits at every
    position of the 4 options in turn."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = []
    for i, thing in enumerate(["sky", "grass", "snow", "coal"] * 2):
        choices = OPTIONS[i % 4:] + OPTIONS[: i % 4]
        rows.append({"q": f"what is the colour of {thing}", "choices": choices,
                     "label": choices.index("right"), "answer": "right"})
    data = d / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "toy_mc.yaml").write_text(MC_YAML.format(name="toy_mc", data=data, prefix=""))
    (d / "toy_mc_a.yaml").write_text(MC_YAML.format(name="toy_mc_a", data=data, prefix="the "))
    (d / "toy_mc_b.yaml").write_text(MC_YAML.format(name="toy_mc_b", data=data, prefix="what "))
    (d / "toy_gen.yaml").write_text(GEN_YAML.format(data=data))
    (d / "toy_group.yaml").write_text(GROUP_YAML)
    (d / "toy_broken.yaml").write_text(MC_YAML.format(name="toy_broken", data=d / "missing.jsonl",
                                                      prefix=""))
    return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub access is needed (the ``json`` builder reads local files).  ``datasets`` reads
    these variables when first imported, so this binds only when it was not imported before."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _cfg(task_dir, tasks, **kw) -> DownstreamConfig:
    return DownstreamConfig(tasks=tasks, include_path=str(task_dir), include_defaults=False,
                            batch_size=4, **kw)


# ------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    cfg = DownstreamConfig()
    assert cfg.tasks == list(DEFAULT_TASKS) == ["arc_challenge", "mmlu", "truthfulqa_mc1", "triviaqa", "gsm8k"]
    assert cfg.metrics == DEFAULT_METRICS
    assert cfg.metric_key("gsm8k") == "exact_match,flexible-extract"
    assert cfg.metric_key("unknown_task") is None
    # a partial user map keeps the defaults for the other tasks
    assert DownstreamConfig(metrics={"x": "f1,none"}).metric_key("mmlu") == "acc,none"
    assert DownstreamConfig(limit=0.5).limit == 0.5
    assert DownstreamConfig(limit=10.0).limit == 10
    for bad in ({"bogus": 1}, {"tasks": []}, {"tasks": ["a", "a"]}, {"limit": 0},
                {"limit": 2.5}, {"batch_size": 0}, {"num_fewshot": -1}):
        with pytest.raises(ValueError):
            DownstreamConfig(**bad)


def test_default_metric_keys_match_installed_lm_eval_yamls():
    """Each default key is "<metric>,<filter>" of a metric and filter the installed task YAML
    defines (a group's aggregate metrics carry the filter "none")."""
    import lm_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    root = Path(lm_eval.__file__).parent / "tasks"
    files = {"arc_challenge": "arc/arc_challenge.yaml", "mmlu": "mmlu/default/_mmlu.yaml",
             "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "triviaqa": "triviaqa/default.yaml",
             "gsm8k": "gsm8k/gsm8k.yaml"}

    def load(path: Path) -> dict:
        cfg = yaml.load(path.read_text(), Loader=Loader) or {}
        if "include" in cfg:
            base = load(path.parent / cfg.pop("include"))
            cfg = {**base, **cfg}
        return cfg

    for task, rel in files.items():
        cfg = load(root / rel)
        assert task in (cfg.get("task"), cfg.get("group")), (task, rel)
        if "aggregate_metric_list" in cfg:
            keys = {f"{m['metric']},none" for m in cfg["aggregate_metric_list"]}
        else:
            filters = [f["name"] for f in cfg.get("filter_list", [])] or ["none"]
            keys = {f"{m['metric']},{f}" for m in cfg["metric_list"] for f in filters}
        assert DEFAULT_METRICS[task] in keys, (task, sorted(keys))


# ------------------------------------------------------------------------------- evaluation


def test_random_model_range_determinism_and_no_side_effects(model, tokenizer, task_dir):
    cfg = _cfg(task_dir, ["toy_mc", "toy_gen"],
               metrics={"toy_mc": "acc_norm,none", "toy_gen": "exact_match,first-word"})
    model.train()
    model.model.layers[0].eval()  # a mixed train/eval state must come back as it was
    padding_side = tokenizer.padding_side
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)

    out = run_downstream(model, tokenizer, cfg)

    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    assert model.training and not model.model.layers[0].training and model.lm_head.training
    assert tokenizer.padding_side == padding_side
    assert set(out) == {"downstream/toy_mc", "downstream/toy_gen"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert out["downstream/toy_gen"] == 0.0  # a random model does not generate "right"
    assert run_downstream(model, tokenizer, cfg) == out  # deterministic


def test_rigged_model_scores_one(tokenizer, task_dir):
    import copy

    model = _rigged_model(tokenizer)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None  # lm-eval would set one: it must get a copy
    cfg = _cfg(task_dir, ["toy_mc", "toy_gen"], metrics={"toy_gen": "exact_match,first-word"},
               limit=6)
    out = run_downstream(model, no_pad, cfg, device="cpu")
    # toy_mc is in no metric map: the first metric ("acc,none") is reported
    assert out == {"downstream/toy_mc": 1.0, "downstream/toy_gen": 1.0}
    assert no_pad.pad_token is None


def test_group_reports_aggregate(tokenizer, task_dir):
    out = run_downstream(_rigged_model(tokenizer), tokenizer,
                         _cfg(task_dir, ["toy_group"], metrics={"toy_group": "acc,none"}))
    assert out == {"downstream/toy_group": 1.0}


def test_peft_wrapped_model(model, tokenizer, task_dir):
    """The adapters are on during lm-eval: a LoRA on lm_head whose (non-zero) bias adds +50 to the
    logit of "right" turns the random model into the rigged one (1.0 on both tasks); with the
    adapters off the same object scores like the base model (toy_gen 0.0)."""
    peft = pytest.importorskip("peft")
    cfg = _cfg(task_dir, ["toy_mc", "toy_gen"], metrics={"toy_gen": "exact_match,first-word"}, limit=4)
    base = run_downstream(model, tokenizer, cfg)
    assert base["downstream/toy_gen"] == 0.0
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"],
                                                         lora_dropout=0.0, lora_bias=True))
    lora_b = wrapped.base_model.model.lm_head.lora_B["default"]
    with torch.no_grad():
        lora_b.weight.zero_()
        lora_b.bias.zero_()
        lora_b.bias[tokenizer.convert_tokens_to_ids("right")] = 50.0  # scaling alpha / r = 1
    wrapped.train()
    out = run_downstream(wrapped, tokenizer, cfg)
    assert out == {"downstream/toy_mc": 1.0, "downstream/toy_gen": 1.0}, out
    assert wrapped.training
    with wrapped.disable_adapter():
        assert run_downstream(wrapped, tokenizer, cfg) == base


# ------------------------------------------------------------------------------- errors


def test_unknown_task_names_the_task(model, tokenizer, task_dir):
    with pytest.raises(DownstreamError, match="toy_mcc") as err:
        run_downstream(model, tokenizer, _cfg(task_dir, ["toy_mc", "toy_mcc"]))
    assert err.value.task == "toy_mcc"
    assert "toy_mc" in str(err.value)  # close match suggested


def test_task_that_fails_to_load_names_the_task(model, tokenizer, task_dir):
    with pytest.raises(DownstreamError, match="toy_broken.*failed to load") as err:
        run_downstream(model, tokenizer, _cfg(task_dir, ["toy_mc", "toy_broken"]))
    assert err.value.task == "toy_broken"


def test_missing_metric_is_a_key_error_naming_task_and_key(model, tokenizer, task_dir):
    cfg = _cfg(task_dir, ["toy_mc"], metrics={"toy_mc": "f1,none"}, limit=2)
    with pytest.raises(KeyError) as err:
        run_downstream(model, tokenizer, cfg)
    assert isinstance(err.value, DownstreamMetricError)
    assert "toy_mc" in str(err.value) and "f1,none" in str(err.value) and "acc,none" in str(err.value)
