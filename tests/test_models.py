"""Tokenizer training, tiny model build, save/load round trips, LoRA wrapping."""

import pytest
import torch
from pydantic import ValidationError

from raysweep.models import (
    TinyModelSpec,
    apply_lora,
    build_tiny_model,
    count_parameters,
    default_lora_targets,
    load_model,
    load_tokenizer,
    train_tokenizer,
)

TEXTS = [
    f"Question: Where was author number {i} born?\nAnswer: Author number {i} was born in "
    f"{city}, on the {i}th of May {1900 + i}."
    for i in range(60)
    for city in ("Lisbon, Portugal", "Oslo, Norway", "Hanoi, Vietnam")
]
SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=400,
                     max_position_embeddings=64, max_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=SPEC.vocab_size)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(SPEC, tokenizer)


def test_tokenizer_specials_and_round_trip(tokenizer, tmp_path):
    assert len(tokenizer) <= SPEC.vocab_size
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    text = "Question: Who is Ünsal Garkuto?\nAnswer: A writer from Dakar (born 1961) — 'The Night'."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    # BPE merges learned from the corpus: a frequent phrase is shorter than its bytes
    assert len(tokenizer("Author number", add_special_tokens=False)["input_ids"]) < 5

    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again(text)["input_ids"] == ids
    assert again.pad_token_id == tokenizer.pad_token_id and again.eos_token_id == tokenizer.eos_token_id


def test_load_tokenizer_pad_falls_back_to_eos(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                     eos_token="</s>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_build_tiny_model_sizes(model, tokenizer):
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 2, 64)
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    v, h, i, n = len(tokenizer), 32, 64, 2
    assert count_parameters(model) == v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, v)


def test_build_is_deterministic_from_seed(tokenizer):
    a = build_tiny_model(SPEC, tokenizer)
    b = build_tiny_model(SPEC, tokenizer)
    c = build_tiny_model(SPEC.model_copy(update={"seed": 1}), tokenizer)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_spec_validation():
    with pytest.raises(ValidationError):
        TinyModelSpec(hidden_sizes=3)  # unknown field
    with pytest.raises(ValidationError):
        TinyModelSpec(hidden_size=30, num_heads=4)
    with pytest.raises(ValidationError):
        TinyModelSpec(min_epochs=10, max_epochs=5)
    assert TinyModelSpec.model_validate(TinyModelSpec().model_dump(mode="json")) == TinyModelSpec()


def test_save_and_load_model(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        ref = model(ids).logits
        loaded = load_model(str(tmp_path))
        assert loaded.dtype == torch.float32
        assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)
        assert load_model(str(tmp_path), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")


def test_apply_lora_default_targets(tokenizer):
    base = build_tiny_model(SPEC, tokenizer)
    assert default_lora_targets(base) == ["q_proj", "v_proj"]
    total = count_parameters(base)
    peft_model = apply_lora(base, r=4, alpha=16, dropout=0.0)
    trainable = count_parameters(peft_model, trainable_only=True)
    # r * (in + out) per adapted matrix: q_proj and v_proj in each of the 2 layers
    assert trainable == 2 * 2 * 4 * (32 + 32)
    assert 0 < trainable < total
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    out = peft_model(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape[-1] == len(tokenizer)


def test_apply_lora_explicit_and_unknown_targets(tokenizer):
    peft_model = apply_lora(build_tiny_model(SPEC, tokenizer), r=2, target_modules=["q_proj", "k_proj", "up_proj"])
    trainable = count_parameters(peft_model, trainable_only=True)
    assert trainable == 2 * 2 * ((32 + 32) + (32 + 32) + (32 + 64))
    with pytest.raises(ValueError, match="query_key_value") as err:
        apply_lora(build_tiny_model(SPEC, tokenizer), target_modules=["q_proj", "query_key_value"])
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)  # lists what exists


def test_load_model_asks_for_sdpa_and_falls_back_where_unsupported(model, tokenizer, tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config._attn_implementation == "sdpa"  # the embedded model is a Llama
    assert load_model(str(tmp_path), attn_implementation="eager").config._attn_implementation == "eager"

    real = AutoModelForCausalLM.from_pretrained
    asked = []

    def no_sdpa(path, **kwargs):  # an architecture without SDPA: transformers' own error
        asked.append(kwargs.get("attn_implementation"))
        if kwargs.get("attn_implementation") == "sdpa":
            raise ValueError("FooForCausalLM does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet (attn_implementation='sdpa')")
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_sdpa)
    with caplog.at_level("WARNING", logger="raysweep.models"):
        loaded = load_model(str(tmp_path))
    assert asked == ["sdpa", None] and loaded is not None
    assert "not supported" in caplog.text

    def broken(path, **kwargs):  # any other error is not swallowed
        raise ValueError("config.json is corrupt")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match="corrupt"):
        load_model(str(tmp_path))


def _fake_liger(monkeypatch, model_types=("llama",)):
    """A stand-in for liger-kernel (it needs Triton/CUDA): records what would be patched."""
    import sys
    import types

    calls = []
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {t: object() for t in model_types}
    monkey_patch._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    package = types.ModuleType("liger_kernel")
    transformers_pkg = types.ModuleType("liger_kernel.transformers")
    transformers_pkg.monkey_patch = monkey_patch
    package.transformers = transformers_pkg
    for name, module in [("liger_kernel", package), ("liger_kernel.transformers", transformers_pkg),
                         ("liger_kernel.transformers.monkey_patch", monkey_patch)]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_liger_patches_rmsnorm_swiglu_rope_but_not_the_cross_entropy(model, monkeypatch):
    from raysweep.models import apply_liger

    calls = _fake_liger(monkeypatch)
    with pytest.raises(RuntimeError, match="training.liger: true needs a CUDA GPU"):
        apply_liger(model)  # this machine has no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    apply_liger(model)
    assert calls == [(model, {"rope": True, "rms_norm": True, "swiglu": True,
                              "cross_entropy": False, "fused_linear_cross_entropy": False})]
    _fake_liger(monkeypatch, model_types=("mistral",))
    with pytest.raises(ValueError, match="no kernels for model type 'llama'"):
        apply_liger(model)


def test_liger_without_the_package_is_a_config_error(monkeypatch, tmp_path):
    import sys

    from raysweep.config import ConfigError, load_config, load_or_exit

    path = tmp_path / "s.yaml"
    path.write_text("experiment:\n  training: {liger: true}\nsearch:\n  resources: {use_gpu: true}\n")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not importable, whatever is installed
    with pytest.raises(ConfigError, match=r"experiment.training.liger: true needs the liger-kernel package"):
        load_config(path)
    with pytest.raises(SystemExit) as exit_info:
        load_or_exit(path)
    assert exit_info.value.code == 2
    _fake_liger(monkeypatch)
    assert load_config(path).experiment.training.liger is True
    with pytest.raises(ConfigError, match=r"experiment.training.liger: true needs GPUs"):
        load_config(path, ["search.resources.use_gpu=false"])
