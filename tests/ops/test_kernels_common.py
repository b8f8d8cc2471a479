"""The launch-time rules every Triton kernel shares (tellneo.kernels.common)."""

from __future__ import annotations

import pytest
import torch

from tellneo.kernels.common import dropout_keep_scale, fp32_precision, interpreting


@pytest.fixture
def tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    yield lambda on: setattr(torch.backends.cuda.matmul, "allow_tf32", on)
    torch.backends.cuda.matmul.allow_tf32 = old


def test_fp32_precision_is_ieee_unless_torch_allows_tf32(tf32):
    tf32(False)
    assert fp32_precision(torch.float32) == "ieee"
    assert fp32_precision(torch.bfloat16) is None and fp32_precision(torch.float16) is None
    tf32(True)
    assert fp32_precision(torch.float32) is None


def test_both_kernel_families_follow_the_rule(tf32):
    pytest.importorskip("triton")
    from tellneo.kernels import fused_linear_kd as K
    from tellneo.kernels.lora_common import dot_flags

    h, w = torch.zeros(2, 3), torch.zeros(5, 3)
    for on in (False, True):
        tf32(on)
        assert dot_flags(torch.float32)["IEEE"] == (fp32_precision(torch.float32) == "ieee") == (not on)
        flags = K._common(K.Head(h, w), K.Head(h, w), 1.0)
        assert flags["PRECISION_S"] == flags["PRECISION_T"] == fp32_precision(torch.float32)


def test_dropout_keep_scale():
    assert dropout_keep_scale(0.0) == 1.0
    assert dropout_keep_scale(0.25) == 1.0 / 0.75


def test_interpreting_reads_the_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
