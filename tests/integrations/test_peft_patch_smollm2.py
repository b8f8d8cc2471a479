"""Real model: SmolLM2-135M-Instruct with LoRA on all linear layers, patched vs plain PEFT (dropout 0)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from tellneo.integrations.peft import patch, unpatch  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny per op (tens of tokens): one intra-op thread is as fast on an idle machine and
    6-15x faster on a loaded shared one, where a second OpenMP thread waits for a busy core at every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Iceland is a Nordic island country in the North Atlantic Ocean, known for its volcanoes.",
]


@pytest.fixture(scope="module")
def peft_smollm2(smollm2):
    base, tok = smollm2
    model = get_peft_model(
        copy.deepcopy(base),  # the session fixture is shared: never wrap it in place
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so every LoRA gradient is non-trivial at step 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    enc = tok(TEXT, return_tensors="pt", padding="max_length", max_length=12, truncation=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    model.train()
    yield model, inputs
    unpatch(model)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_curve(model, inputs, steps):
    # A moderate learning rate: driving 24 tokens' loss towards 0 makes AdamW's trajectory chaotic (tiny
    # gradients normalised to full steps), and then any rounding difference, even between two runs of the same
    # code, shows up in the curve.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_smollm2_patched_loss_grads_and_training_curve_match_peft(peft_smollm2):
    model, inputs = peft_smollm2
    start = lora_state(model)
    n_lora_linear = 7 * model.base_model.model.config.num_hidden_layers

    model.zero_grad(set_to_none=True)
    loss_ref = model(**inputs).loss
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    curve_ref = train_curve(model, inputs, 20)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    report = patch(model)
    assert len(report) == n_lora_linear and not report.skipped

    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert len(grads_ref) == 2 * n_lora_linear
    for n, g in grads_ref.items():
        got = model.get_parameter(n).grad
        assert g.abs().max() > 0, n
        atol = 1e-6 + 2e-3 * g.abs().max().item()
        torch.testing.assert_close(got, g, rtol=2e-3, atol=atol, msg=lambda m: f"{n}: {m}")
    curve = train_curve(model, inputs, 20)
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(curve_ref), rtol=1e-3, atol=1e-3,
                               msg=lambda m: f"{m}\npatched {curve}\npeft    {curve_ref}")
    assert curve_ref[-1] < 0.7 * curve_ref[0]  # the run really trains
