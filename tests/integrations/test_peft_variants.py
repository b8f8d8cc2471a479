"""PEFT LoRA variants on the fused path: rsLoRA and the PiSSA / OLoRA initialisations are fused and give PEFT's
forward and backward; DoRA, ``lora_bias``, fan_in_fan_out (Conv1D) and several active adapters are left on PEFT's
forward with the reason in the patch report (tiny random models; dropout 0 so both paths compute the same)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_llama_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import tellneo.integrations.peft as integration  # noqa: E402
from tellneo.integrations.peft import is_patched, patch  # noqa: E402

VOCAB = tiny_llama_config().vocab_size
N_LORA = 14  # LoRA linear layers of the 2-layer tiny Llama with target_modules="all-linear"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fused_calls(monkeypatch):
    """The scaling argument of every call of the fused op (the op itself still runs)."""
    calls: list[float] = []
    real = integration.lora_linear

    def spy(x, weight, lora_a, lora_b, scaling, **kwargs):
        calls.append(scaling)
        return real(x, weight, lora_a, lora_b, scaling, **kwargs)

    monkeypatch.setattr(integration, "lora_linear", spy)
    return calls


def tiny_peft(**lora):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    cfg.update(lora)
    return get_peft_model(model, LoraConfig(**cfg))


def forward_backward(model, ids):
    """Loss, logits and the gradients of every trainable parameter and of the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad.clone()
    return out.loss.detach(), out.logits.detach(), grads


def assert_same_as_peft(model, ref, ids):
    loss, logits, grads = forward_backward(model, ids)
    loss_ref, logits_ref, grads_ref = forward_backward(ref, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * N_LORA + 1
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# rsLoRA with alpha / sqrt(r) != alpha / r, so a recomputed alpha / r would fail; PiSSA moves the principal part of
# the base weight into the adapter (both change), OLoRA likewise with a QR decomposition.
FUSED_VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True, r=8, lora_alpha=4),
    "pissa": dict(init_lora_weights="pissa"),
    "pissa_niter_4": dict(init_lora_weights="pissa_niter_4"),
    "olora": dict(init_lora_weights="olora"),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
def test_fused_variant_matches_peft_forward_and_backward(variant, backend, mode, fused_calls):
    model = tiny_peft(**FUSED_VARIANTS[variant])
    ref = copy.deepcopy(model)
    report = patch(model, backend=backend)
    assert len(report) == N_LORA and not report.skipped
    for m in (model, ref):
        m.train(mode == "train")
    n, t = (1, 8) if backend == "triton" else (2, 12)
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))
    assert_same_as_peft(model, ref, ids)
    assert len(fused_calls) == N_LORA and not report.not_fused(), report.summary()
    layer = model.get_submodule(Q_PROJ)
    assert fused_calls[0] == layer.scaling["default"]


def test_rslora_scaling_reaches_the_fused_op(fused_calls):
    """The op is given the layer's own scaling (alpha / sqrt(r) under rsLoRA), also after PEFT rescales it."""
    model = tiny_peft(use_rslora=True, r=16, lora_alpha=3)
    patch(model, backend="torch")
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
    assert fused_calls == [pytest.approx(3 / math.sqrt(16))] * N_LORA
    for module in model.modules():
        if is_patched(module):
            module.scale_layer(0.5)
    ref = copy.deepcopy(model)
    integration.unpatch(ref)
    fused_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert fused_calls == [pytest.approx(0.5 * 3 / 4)] * N_LORA


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dora_layers_are_left_to_peft_and_reported(mode, fused_calls):
    model = tiny_peft(use_dora=True)
    ref = copy.deepcopy(model)
    report = patch(model)
    assert len(report) == 0 and len(report.skipped) == N_LORA
    assert not any(is_patched(m) for m in model.modules())
    assert all("uses DoRA" in reason for reason in report.skipped.values())
    assert report.not_fused() == report.skipped
    assert report.to_dict()["not_fused"] == N_LORA and list(report.to_dict()["not_fused_reasons"].values()) == [N_LORA]
    assert "DoRA" in report.summary() and Q_PROJ in report.summary()
    for m in (model, ref):
        m.train(mode == "train")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    loss, logits, grads = forward_backward(model, ids)
    loss_ref, logits_ref, grads_ref = forward_backward(ref, ids)
    assert fused_calls == []
    assert torch.equal(logits, logits_ref) and any("magnitude" in n for n in grads)
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name


def test_dora_adapter_added_after_patch_falls_back_per_call(fused_calls):
    model = tiny_peft()
    report = patch(model)
    torch.manual_seed(7)
    model.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True,
                                         init_lora_weights=False))
    model.set_adapter("dora")
    ref = copy.deepcopy(model)
    integration.unpatch(ref)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert fused_calls == []
    assert len(report.fell_back()) == N_LORA and all("DoRA" in r for r in report.not_fused().values())


def test_lora_bias_is_left_to_peft():
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(mlp_bias=True, attention_bias=True)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True,
                                      init_lora_weights=False))
    for module in model.modules():  # lora_B biases start at zero: make them matter
        if isinstance(module, torch.nn.Linear) and module.bias is not None and module.weight.requires_grad:
            torch.nn.init.normal_(module.bias)
    ref = copy.deepcopy(model)
    report = patch(model)
    assert len(report) == 0 and set(report.skipped.values()) == {"adapter 'default' has lora_bias=True"}
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_bias_on_lora_b_without_the_lora_bias_flag_is_not_fused():
    """The fused op has no adapter bias: a lora_B with a bias is refused even if the flag says otherwise."""
    model = tiny_peft()
    layer = model.get_submodule(Q_PROJ)
    layer.lora_B["default"].bias = torch.nn.Parameter(torch.ones(layer.out_features))
    report = patch(model)
    assert len(report) == N_LORA - 1 and "non-standard lora_A/lora_B" in report.skipped[Q_PROJ]


def test_a_tensor_scaling_is_not_fused(fused_calls):
    """A scaling that is not a plain number (e.g. a learnable tensor) would be cut off from autograd by float():
    such a layer is left to PEFT, at patch time and, if set later, per call."""
    model = tiny_peft()
    model.get_submodule(Q_PROJ).scaling["default"] = torch.tensor(2.0, requires_grad=True)
    report = patch(model)
    assert "scaling is Tensor" in report.skipped[Q_PROJ] and len(report) == N_LORA - 1
    k_proj = Q_PROJ.replace("q_proj", "k_proj")
    model.get_submodule(k_proj).scaling["default"] = torch.tensor(2.0, requires_grad=True)
    model(input_ids=torch.randint(0, VOCAB, (1, 5)))
    assert "scaling is Tensor" in report.fell_back()[k_proj] and len(fused_calls) == N_LORA - 2


def test_fan_in_fan_out_conv1d_is_left_to_peft():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                            init_lora_weights=False))
    ref = copy.deepcopy(model)
    report = patch(model)
    assert len(report) == 0 and len(report.skipped) == 3
    assert all("fan_in_fan_out" in r for r in report.skipped.values())
    ids = torch.randint(0, 97, (1, 8))
    model.eval(), ref.eval()  # GPT-2's own dropouts
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_two_active_adapters_run_peft_forward_and_are_reported(fused_calls):
    model = tiny_peft()
    torch.manual_seed(5)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    report = patch(model)
    assert len(report) == N_LORA
    model.base_model.set_adapter(["default", "other"])
    ref = copy.deepcopy(model)
    integration.unpatch(ref)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert fused_calls == []
    assert set(report.not_fused().values()) == {"2 active LoRA adapters (the fused op handles exactly one)"}
