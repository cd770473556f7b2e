"""Unit tests of raysweep.losses: hand-computed values, signs, registry, compute_loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from raysweep import losses as L

# ---------------------------------------------------------------------------------------------
# Fixtures: hand-written logits and a tiny Llama
# ---------------------------------------------------------------------------------------------


def _log(probs):
    return [math.log(p) for p in probs]


@pytest.fixture
def hand():
    """B=2, T=3, K=3. Example 0: question token 0, answer labels (0, 1); example 1: answer (2)."""
    logits = torch.tensor(
        [
            [_log([0.5, 0.25, 0.25]), _log([0.2, 0.6, 0.2]), [0.0, 0.0, 0.0]],
            [[3.0, -1.0, 0.5], _log([0.1, 0.1, 0.8]), [0.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 2]])
    return logits, labels


VOCAB = 32


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = LlamaForCausalLM(config).float()
    model.eval()
    return model


def _part(gen, q_lens, a_lens):
    """Right-padded part: random question/answer tokens, labels -100 on question and padding."""
    length = max(q + a for q, a in zip(q_lens, a_lens)) + 1
    input_ids = torch.zeros(len(q_lens), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (q, a) in enumerate(zip(q_lens, a_lens)):
        ids = torch.randint(1, VOCAB, (q + a,), generator=gen)
        input_ids[i, : q + a] = ids
        attention_mask[i, : q + a] = 1
        labels[i, q : q + a] = ids[q:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batch(seed=0, index=(4, 1, 3)):
    gen = torch.Generator().manual_seed(seed)
    return {
        "forget": _part(gen, [3, 4, 2], [4, 2, 5]),
        "forget_idk": _part(gen, [3, 4, 2], [3, 5, 3]),
        "retain": _part(gen, [2, 3, 4], [5, 3, 2]),
        "retain_idk": _part(gen, [2, 3, 4], [3, 3, 4]),
        "index": torch.tensor(index),
    }


def _perturbed(model, scale=0.05, seed=1):
    """A copy of the model moved away from the reference."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------


def test_sequence_nll_and_mean_ce_by_hand(hand):
    logits, labels = hand
    nll = L.sequence_nll(logits, labels)
    expected = [-math.log(0.5) - math.log(0.6), -math.log(0.8)]
    assert torch.allclose(nll, torch.tensor(expected), atol=1e-6)
    # token mean over the 3 answer tokens of the batch, not a mean of per-sequence means
    ce = -(math.log(0.5) + math.log(0.6) + math.log(0.8)) / 3
    assert L.mean_ce(logits, labels).item() == pytest.approx(ce, abs=1e-6)
    assert L.ga_loss(logits, labels).item() == pytest.approx(-ce, abs=1e-6)
    assert L.idk_loss(logits, labels).item() == pytest.approx(ce, abs=1e-6)
    assert L.gd_loss(logits, labels).item() == pytest.approx(ce, abs=1e-6)


def test_mean_ce_matches_hf_loss(tiny_model):
    part = _batch()["forget"]
    logits = tiny_model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    hf = tiny_model(**part).loss
    assert L.mean_ce(logits, part["labels"]).item() == pytest.approx(hf.item(), abs=1e-5)


def test_npo_by_hand_and_sign():
    beta = 0.5
    theta, ref = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    ls = lambda z: -math.log1p(math.exp(-z))  # noqa: E731 (log sigmoid)
    expected = -(2 / beta) * (ls(beta * 1.0) + ls(0.0)) / 2
    assert L.npo_loss(theta, ref, beta).item() == pytest.approx(expected, abs=1e-6)
    # at theta == ref: (2/beta) log 2
    assert L.npo_loss(ref, ref, beta).item() == pytest.approx(2 / beta * math.log(2), abs=1e-6)
    # falls as the forget NLL rises (the model forgets)
    npo = [L.npo_loss(ref + d, ref, beta).item() for d in (0.0, 1.0, 3.0)]
    assert npo[0] > npo[1] > npo[2]


def test_dpo_by_hand():
    beta = 0.1
    th_idk, th_y = torch.tensor([3.0]), torch.tensor([1.0])
    ref_idk, ref_y = torch.tensor([4.0]), torch.tensor([1.5])
    # (log p(idk) - log p(y)) - ref same = (-3 + 1) - (-4 + 1.5) = 0.5
    z = 0.5
    expected = -(2 / beta) * -math.log1p(math.exp(-beta * z))
    got = L.dpo_loss(th_idk, th_y, ref_idk, ref_y, beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    same = L.dpo_loss(ref_idk, ref_y, ref_idk, ref_y, beta)
    assert same.item() == pytest.approx(2 / beta * math.log(2), abs=1e-6)
    # raising p(idk) lowers the loss
    assert L.dpo_loss(th_idk - 1, th_y, ref_idk, ref_y, beta) < got


def test_ap_by_hand_and_gradient_weight():
    beta = 0.1
    nll_idk = torch.tensor([2.0, 5.0], requires_grad=True)
    nll_y = torch.tensor([3.0, 1.0], requires_grad=True)
    loss = L.ap_loss(nll_idk, nll_y, beta)
    log_sig = [-math.log1p(math.exp(-beta * (i - y))) for i, y in [(2, 3), (5, 1)]]
    expected = -(1 / beta) * sum(log_sig) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # Eq. (9): W = 1 / (1 + (p(y|x)/p(idk|x))**beta); dL/dNLL_idk = -W/B, dL/dNLL_y = +W/B
    p_idk, p_y = torch.exp(-nll_idk.detach()), torch.exp(-nll_y.detach())
    w = 1 / (1 + (p_y / p_idk) ** beta)
    assert torch.allclose(L.ap_weight(nll_idk.detach(), nll_y.detach(), beta), w, atol=1e-6)
    assert torch.allclose(nll_idk.grad, -w / 2, atol=1e-6)
    assert torch.allclose(nll_y.grad, w / 2, atol=1e-6)


def test_ap_weight_rises_with_p_idk():
    nll_y = torch.tensor([2.0, 2.0, 2.0])
    nll_idk = torch.tensor([6.0, 4.0, 1.0])  # p(idk|x) rising
    w = L.ap_weight(nll_idk, nll_y, beta=0.1)
    assert w[0] < w[1] < w[2]


def test_ap_gradient_identity_on_model(tiny_model):
    """grad L_AP = mean_i -W_i (grad log p(y_i|x_i) - grad log p(idk_i|x_i)), by autograd."""
    model, beta = copy.deepcopy(tiny_model), 0.1
    batch = _batch(seed=3)
    params = list(model.parameters())

    def nlls():
        step = L.StepForward(model, batch, L.LossParams(beta=beta))
        return step.nll("retain_idk"), step.nll("retain")

    nll_idk, nll_y = nlls()
    grad_ap = torch.autograd.grad(L.ap_loss(nll_idk, nll_y, beta), params)
    w = L.ap_weight(nll_idk.detach(), nll_y.detach(), beta)
    bsz = len(w)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(bsz):
        nll_idk, nll_y = nlls()
        g_logp_y = torch.autograd.grad(-nll_y[i], params)
        g_logp_idk = torch.autograd.grad(-nll_idk[i], params)
        for e, gy, gi in zip(expected, g_logp_y, g_logp_idk):
            e -= w[i] * (gy - gi) / bsz
    for g, e in zip(grad_ap, expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-4)


def test_me_paper_is_log_k_minus_entropy(hand):
    logits, _ = hand
    mask = torch.ones(2, 3, dtype=torch.long)
    probs = torch.softmax(logits[:, :-1], dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    got = L.me_loss(logits, mask, divergence="paper")
    assert got.item() == pytest.approx(math.log(3) - entropy.item(), abs=1e-6)


def test_me_code_by_hand():
    # one prediction position with P = (0.5, 0.25, 0.25): KL(U||P) = -log 3 - mean(log P)
    logits = torch.tensor([[_log([0.5, 0.25, 0.25]), [0.0, 0.0, 0.0]]])
    expected = -math.log(3) - sum(_log([0.5, 0.25, 0.25])) / 3
    assert L.me_loss(logits, divergence="code").item() == pytest.approx(expected, abs=1e-6)


def test_me_zero_on_uniform_positive_otherwise(hand):
    uniform = torch.full((2, 4, 5), 1.7)
    for divergence in ("code", "paper"):
        assert L.me_loss(uniform, divergence=divergence).item() == pytest.approx(0.0, abs=1e-6)
        assert L.me_loss(hand[0], divergence=divergence).item() > 0.01


def test_me_masks_padding_and_question():
    # positions 0..2 predict tokens 1..3; token 3 is padding -> position 2 excluded
    base = torch.tensor(
        [[_log([0.5, 0.25, 0.25]), _log([0.2, 0.6, 0.2]), [0.0, 0.0, 0.0], [0.0] * 3]]
    )
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 1, -100]])
    wild = base.clone()
    wild[0, 2] = torch.tensor([9.0, -9.0, 0.0])  # predicts the pad token: must not count
    per_pos = [-math.log(3) - sum(_log(p)) / 3 for p in ([0.5, 0.25, 0.25], [0.2, 0.6, 0.2])]
    assert L.me_loss(wild, attention_mask).item() == pytest.approx(sum(per_pos) / 2, abs=1e-6)
    # answer-only: just position 1 (predicts the answer label at 2)
    got = L.me_loss(wild, attention_mask, labels, mask_question=True)
    assert got.item() == pytest.approx(per_pos[1], abs=1e-6)
    with pytest.raises(ValueError):
        L.me_loss(wild, attention_mask, mask_question=True)
    with pytest.raises(ValueError):
        L.me_loss(wild, divergence="nope")


def test_kl_by_hand_and_padding():
    p = [0.5, 0.25, 0.25]
    q = [0.2, 0.6, 0.2]
    logits = torch.tensor([[_log(q), _log(q), [5.0, 0.0, 0.0]]])
    ref_logits = torch.tensor([[_log(p), _log(q), [0.0, 0.0, 0.0]]])
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))
    # positions 0 and 1 count (third token real); KL at position 1 is 0
    full = L.kl_loss(logits, ref_logits, torch.tensor([[1, 1, 1]]))
    assert full.item() == pytest.approx(kl_pq / 2, abs=1e-6)
    # third token padding -> position 1 excluded
    padded = L.kl_loss(logits, ref_logits, torch.tensor([[1, 1, 0]]))
    assert padded.item() == pytest.approx(kl_pq, abs=1e-6)
    assert L.kl_loss(logits, logits.clone(), None).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_all_paper_methods_parse():
    assert len(L.METHODS) == 11 and len(set(L.METHODS)) == 11
    for name in L.METHODS:
        method = L.parse_method(name)
        assert method.name == name
        assert method.regularizer is not None
    assert L.parse_method("GA").regularizer is None
    assert L.parse_method("GA").name == "GA"
    assert L.parse_method("me_gd").name == "ME+GD"
    assert L.parse_method(" npo + kl ").name == "NPO+KL"
    method = L.parse_method("IDK+AP")
    assert L.parse_method(method) is method


@pytest.mark.parametrize("bad", ["XYZ", "GA+XX", "GD", "GA+GD+KL", "", "+GD", 3])
def test_unknown_method_raises(bad):
    with pytest.raises(ValueError, match="NPO"):
        L.parse_method(bad)


def test_method_properties():
    m = L.parse_method
    assert m("NPO+GD").needs_ref_logps and not m("NPO+GD").needs_ref_model
    assert m("NPO+GD").ref_logp_keys == ("forget",)
    assert m("DPO+AP").ref_logp_keys == ("forget", "forget_idk")
    assert m("NPO+KL").needs_ref_logps and m("NPO+KL").needs_ref_model
    assert m("ME+KL").needs_ref_model and not m("ME+KL").needs_ref_logps
    assert not m("GA+GD").needs_ref_logps and not m("GA+GD").needs_ref_model
    assert not m("GA+GD").needs_idk and m("IDK+GD").needs_idk and m("ME+GD").needs_retain
    assert m("IDK+AP").batch_keys == ("forget_idk", "retain", "retain_idk")
    assert not m("GA").needs_retain


def test_loss_params_validation():
    assert L.LossParams() == L.LossParams(1.0, 1.0, 0.1, "code", False)
    with pytest.raises(ValueError):
        L.LossParams(beta=0)
    with pytest.raises(ValueError):
        L.LossParams(me_divergence="kl")


# ---------------------------------------------------------------------------------------------
# compute_loss on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", L.METHODS + ("GA", "ME"))
def test_compute_loss_every_method(tiny_model, name):
    method = L.parse_method(name)
    model = _perturbed(tiny_model)
    batch = _batch(index=(0, 1, 2))
    ref_logps = (
        L.collect_reference_logps(tiny_model, [batch], 3, method.ref_logp_keys)
        if method.needs_ref_logps
        else None
    )
    ref_model = tiny_model if method.needs_ref_model else None
    loss, parts = L.compute_loss(method, model, batch, L.LossParams(), ref_model, ref_logps)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert set(parts) == {"loss", "forget_loss", "reg_loss"}
    assert parts["loss"] == pytest.approx(parts["forget_loss"] + parts["reg_loss"], abs=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_compute_loss_coefficients(tiny_model):
    batch = _batch()
    _, parts = L.compute_loss("GA+GD", tiny_model, batch)
    loss, scaled = L.compute_loss("GA+GD", tiny_model, batch, L.LossParams(0.5, 2.0))
    assert scaled["forget_loss"] == pytest.approx(parts["forget_loss"])  # parts are unscaled
    expected = 0.5 * parts["forget_loss"] + 2.0 * parts["reg_loss"]
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    _, no_reg = L.compute_loss("GA+GD", tiny_model, batch, L.LossParams(reg_coeff=0.0))
    assert no_reg["reg_loss"] == 0.0 and no_reg["loss"] == pytest.approx(parts["forget_loss"])


def test_missing_reference_inputs_raise(tiny_model):
    batch = _batch()
    with pytest.raises(ValueError, match="ref_logps"):
        L.compute_loss("NPO+GD", tiny_model, batch)
    with pytest.raises(ValueError, match="ref_model"):
        L.compute_loss("ME+KL", tiny_model, batch)
    with pytest.raises(ValueError, match="ref_model"):
        L.compute_loss("NPO+KL", tiny_model, batch, ref_logps={"forget_nll": torch.zeros(6)})
    with pytest.raises(ValueError, match="missing"):
        L.collect_reference_logps(tiny_model, [batch], 6)  # indices 0, 2, 5 never seen


def test_kl_zero_when_model_is_ref(tiny_model):
    _, parts = L.compute_loss("ME+KL", tiny_model, _batch(), ref_model=copy.deepcopy(tiny_model))
    assert parts["reg_loss"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["NPO+GD", "DPO+AP"])
def test_precomputed_ref_logps_match_live_ref_model(tiny_model, name):
    ref = copy.deepcopy(tiny_model)  # the frozen reference (initial) model
    model = _perturbed(tiny_model)
    method = L.parse_method(name)
    batch = _batch(index=(4, 1, 3))
    # precompute over a whole "forget set" of 6 examples in two batches, then index
    other = _batch(seed=7, index=(0, 2, 5))
    ref_logps = L.collect_reference_logps(ref, [other, batch], 6, method.ref_logp_keys)

    loss_pre, _ = L.compute_loss(method, model, batch, ref_logps=ref_logps)
    loss_pre.backward()
    grads_pre = _grads(model)
    model.zero_grad()
    loss_live, _ = L.compute_loss(method, model, batch, ref_model=ref)
    loss_live.backward()
    assert loss_pre.item() == pytest.approx(loss_live.item(), abs=1e-6)
    assert loss_pre.item() != pytest.approx(2 / 0.1 * math.log(2), abs=1e-3)  # theta != ref
    for a, b in zip(grads_pre, _grads(model)):
        assert torch.allclose(a, b, atol=1e-7)


def test_npo_at_reference_is_log2(tiny_model):
    batch = _batch()
    ref_logps = L.collect_reference_logps(tiny_model, [batch, _batch(7, (0, 2, 5))], 6)
    loss, _ = L.compute_loss("NPO", tiny_model, batch, ref_logps=ref_logps)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)
    loss, _ = L.compute_loss("DPO", tiny_model, batch, ref_logps=ref_logps)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)


def test_reference_logps_no_grad_and_restores_mode(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    out = L.reference_logps(model, _batch())
    assert set(out) == {"forget_nll", "forget_idk_nll"}
    assert out["forget_nll"].shape == (3,) and not out["forget_nll"].requires_grad
    assert model.training


# ---------------------------------------------------------------------------------------------
# Directions: one SGD step
# ---------------------------------------------------------------------------------------------


def _sgd_step(model, name, batch, lr=0.05, **kw):
    loss, _ = L.compute_loss(name, model, batch, **kw)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _nll(model, batch, key):
    with torch.no_grad():
        return L.StepForward(model, batch, L.LossParams()).nll(key).sum().item()


def test_ga_step_lowers_forget_logprob(tiny_model):
    model, batch = copy.deepcopy(tiny_model), _batch()
    before = _nll(model, batch, "forget")
    _sgd_step(model, "GA", batch)
    assert _nll(model, batch, "forget") > before


def test_idk_step_raises_template_logprob(tiny_model):
    model, batch = copy.deepcopy(tiny_model), _batch()
    before = _nll(model, batch, "forget_idk")
    _sgd_step(model, "IDK", batch)
    assert _nll(model, batch, "forget_idk") < before


def test_npo_step_lowers_forget_logprob(tiny_model):
    model, batch = copy.deepcopy(tiny_model), _batch()
    ref_logps = L.collect_reference_logps(model, [batch, _batch(7, (0, 2, 5))], 6, ("forget",))
    before = _nll(model, batch, "forget")
    _sgd_step(model, "NPO", batch, ref_logps=ref_logps)
    assert _nll(model, batch, "forget") > before


def test_ap_step_prefers_answer_over_idk(tiny_model):
    model, batch = copy.deepcopy(tiny_model), _batch()
    margin = lambda: _nll(model, batch, "retain_idk") - _nll(model, batch, "retain")  # noqa: E731
    before = margin()
    _sgd_step(model, "ME+AP", batch, params=L.LossParams(forget_coeff=0.0))
    assert margin() > before


def test_me_step_raises_entropy(tiny_model):
    model, batch = copy.deepcopy(tiny_model), _batch()
    me = lambda: L.compute_loss("ME", model, batch)[1]["forget_loss"]  # noqa: E731
    before = me()
    _sgd_step(model, "ME", batch)
    assert me() < before


def test_me_code_and_kl_match_torch_kl_div():
    """ME "code" is KL(U||P) and the KL regularizer is KL(ref||theta), as torch's kl_div."""
    gen = torch.Generator().manual_seed(5)
    logits, ref_logits = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    logp = torch.log_softmax(logits[:, :-1], -1)
    uniform = torch.full_like(logp, 1 / 6)
    me = torch.nn.functional.kl_div(logp, uniform, reduction="none").sum(-1).mean()
    assert L.me_loss(logits).item() == pytest.approx(me.item(), abs=1e-6)
    ref_logp = torch.log_softmax(ref_logits[:, :-1], -1)
    kl = torch.nn.functional.kl_div(logp, ref_logp, reduction="none", log_target=True)
    kl = kl.sum(-1).mean()
    assert L.kl_loss(logits, ref_logits).item() == pytest.approx(kl.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["ME+KL", "GA+KL"])
def test_lora_reference_with_adapters_off_equals_a_copy_of_the_base(tiny_model, name):
    """KL under LoRA uses the model with its adapters switched off instead of a deep copy: the
    same loss and gradients, no second model, and the trained model keeps its train mode."""
    from raysweep.models import AdapterDisabled, apply_lora

    base_copy = copy.deepcopy(tiny_model)
    model = apply_lora(copy.deepcopy(tiny_model), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # move the adapters away from zero, as training would
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    model.train()
    batch = _batch()
    method = L.parse_method(name)
    loss_copy, _ = L.compute_loss(method, model, batch, ref_model=base_copy)
    loss_copy.backward()
    grads_copy = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss_off, parts_off = L.compute_loss(method, model, batch, ref_model=AdapterDisabled(model))
    loss_off.backward()
    assert model.training  # borrowed for the reference pass, handed back in train mode
    assert loss_off.item() == pytest.approx(loss_copy.item(), abs=1e-6)
    assert parts_off["reg_loss"] > 1e-6  # the adapters moved the model: KL is not trivially 0
    for a, b in zip(grads_copy, [p.grad for p in model.parameters() if p.requires_grad]):
        assert torch.allclose(a, b, atol=1e-7)
    with pytest.raises(TypeError, match="peft model"):
        AdapterDisabled(tiny_model)


# ---------------------------------------------------------------------------------------------
# One forward per step: the fused path against one forward per part
# ---------------------------------------------------------------------------------------------


def _left_padded(part):
    """The same examples left-padded (each row's real tokens moved to the end)."""
    out = {k: torch.zeros_like(v) for k, v in part.items()}
    out["labels"].fill_(-100)
    for row, n in enumerate(part["attention_mask"].sum(dim=1).tolist()):
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][row, -n:] = part[key][row, :n]
    return out


def _uneven_batch():
    """Parts of four different widths (8, 11, 6, 9 tokens)."""
    gen = torch.Generator().manual_seed(3)
    return {
        "forget": _part(gen, [3, 4, 2], [4, 2, 5]),
        "forget_idk": _part(gen, [3, 4, 2], [3, 6, 3]),
        "retain": _part(gen, [2, 3, 1], [3, 2, 2]),
        "retain_idk": _part(gen, [2, 3, 4], [3, 3, 4]),
        "index": torch.tensor((0, 1, 2)),
    }


def _loss_and_grads(method, model, batch, params, ref_model, ref_logps, **kw):
    model.zero_grad(set_to_none=True)
    loss, parts = L.compute_loss(method, model, batch, params, ref_model, ref_logps, **kw)
    loss.backward()
    return loss.detach(), parts, [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("protocol", ["raysweep", "seed"])
@pytest.mark.parametrize("name", L.METHODS)
def test_one_fused_forward_gives_the_loss_and_gradients_of_one_forward_per_part(tiny_model, name, protocol,
                                                                                padding_side):
    """The parts have different widths: the fused batch pads them, runs once and splits back;
    loss, its parts and every gradient equal the per-part path's to 1e-5."""
    method = L.parse_method(name)
    model = _perturbed(tiny_model)
    batch = _uneven_batch()
    if padding_side == "left":
        batch = {k: (_left_padded(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    assert len({batch[k]["input_ids"].shape[1] for k in method.batch_keys}) == len(method.batch_keys)
    ref_model = tiny_model if method.needs_ref_model or method.needs_ref_logps else None  # NPO/DPO: live reference
    params = L.LossParams(beta=0.3, protocol=protocol)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fused = _loss_and_grads(method, model, batch, params, ref_model, None, padding_side=padding_side)
        assert len(calls) == 1  # one forward of the trained model per step
        per_part = _loss_and_grads(method, model, batch, params, ref_model, None, fuse=False)
        assert len(calls) == 1 + len(method.batch_keys)
    finally:
        hook.remove()
    assert fused[0] == pytest.approx(per_part[0].item(), abs=1e-5, rel=1e-5)
    for key in ("forget_loss", "reg_loss"):
        assert fused[1][key] == pytest.approx(per_part[1][key], abs=1e-5, rel=1e-5)
    for got, want in zip(fused[2], per_part[2]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_reference_forward_runs_once(tiny_model):
    """DPO+KL with a live reference: the reference's three parts run in one forward too."""
    ref = copy.deepcopy(tiny_model)
    calls = []
    ref.register_forward_pre_hook(lambda module, args: calls.append(1))
    L.compute_loss("DPO+KL", _perturbed(tiny_model), _uneven_batch(), L.LossParams(), ref_model=ref)
    assert len(calls) == 1


def test_as_tensors_keeps_parts_on_the_device(tiny_model):
    loss, parts = L.compute_loss("GA+GD", tiny_model, _batch(), as_tensors=True)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    assert parts["loss"].item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="padding_side"):
        L.compute_loss("GA+GD", tiny_model, _batch(), padding_side="middle")


@pytest.mark.parametrize("name", ["GA+GD", "IDK+AP"])
def test_fused_left_padding_keeps_absolute_positions(name):
    """Llama's rotary positions are shift-invariant, GPT-2's learned absolute ones are not: on
    GPT-2 the left-padded fused batch must pass each token its own part's position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2)).float()
    model.eval()
    batch = {k: (_left_padded(v) if isinstance(v, dict) else v) for k, v in _uneven_batch().items()}
    fused = _loss_and_grads(name, model, batch, L.LossParams(), None, None, padding_side="left")
    per_part = _loss_and_grads(name, model, batch, L.LossParams(), None, None, fuse=False)
    assert fused[0] == pytest.approx(per_part[0].item(), abs=1e-5, rel=1e-5)
    for got, want in zip(fused[2], per_part[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
