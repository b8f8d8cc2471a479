"""The PEFT patch report says what actually runs: a bf16 model with PEFT's fp32 adapters is fused only under
autocast, and the first forward records per layer whether it ran fused or PEFT's forward (and logs it)."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from conftest import tiny_llama_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from tellneo.integrations.peft import patch, unpatch  # noqa: E402
from tests.recipes.helpers import one_thread  # noqa: E402, F401 (fixture)


def tiny_peft(dtype=torch.float32):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)  # PEFT upcasts the adapters of a bf16 model to fp32 (autocast_adapter_dtype)


def ids():
    return torch.randint(0, tiny_llama_config().vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def test_bf16_model_without_autocast_is_reported_as_not_fused(caplog):
    model = tiny_peft(torch.bfloat16)
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert a.dtype == torch.float32  # the situation the report must not hide
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    with caplog.at_level(logging.INFO, logger="tellneo"):
        report = patch(model)
        assert len(report) == 14 and len(report.autocast_only) == 14
        assert set(report.autocast_only.values()) == {"base bfloat16, adapters float32"}
        assert "14 of them fuse only under torch.autocast" in caplog.text
        caplog.clear()
        with torch.no_grad():
            out = model(input_ids=ids()).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # PEFT's forward ran: bitwise PEFT's result
    fell = report.fell_back()
    assert sorted(fell) == sorted(report.patched) and all("mixed dtypes" in r for r in fell.values())
    assert "first forward: 0 ran fused, 14 ran PEFT's forward" in caplog.text
    assert "first forward: 0 ran fused, 14 ran PEFT's forward" in report.summary()


def test_bf16_model_under_autocast_runs_fused(caplog):
    model = tiny_peft(torch.bfloat16)
    report = patch(model)
    with caplog.at_level(logging.INFO, logger="tellneo"), torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids())
    assert len(report.first_forward) == 14 and not report.fell_back()
    assert "all 14 patched LoRA layer(s) ran fused" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tellneo"), torch.no_grad():
        model(input_ids=ids())  # the watch logs the first forward only
    assert "first forward" not in caplog.text


def test_fp32_model_report_and_repatch_and_pickle():
    model = tiny_peft()
    report = patch(model)
    assert not report.autocast_only
    model(input_ids=ids())
    assert len(report.first_forward) == 14 and not report.fell_back()
    again = patch(model)  # idempotent: a fresh report that the next first forward fills
    assert again.patched == report.patched and not again.first_forward
    pickle.loads(pickle.dumps(model))  # the first-forward watch keeps the model picklable
    model(input_ids=ids())
    assert len(again.first_forward) == 14
    unpatch(model)
    assert "_tellneo_lora_first_forward" not in vars(model) and not model._forward_hooks
