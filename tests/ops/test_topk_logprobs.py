"""tellneo.ops.topk_logprobs: the sparse teacher input of fused_linear_kd, computed with the op's own rules."""

from __future__ import annotations

import pytest
import torch

from tellneo.ops import fused_linear_kd, topk_logprobs


def _case(n=9, h=6, v=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)


def test_matches_full_log_softmax_with_transform_temperature_and_chunks():
    x, w, b = _case()
    ids, lps = topk_logprobs(x, w, 5, bias=b, temperature=2.0, softcap=3.0, logit_scale=0.5, chunk_rows=4)
    full = torch.log_softmax(3.0 * torch.tanh((x @ w.t() + b) * 0.5 / 3.0) / 2.0, -1)
    want = full.topk(5, -1)
    assert ids.dtype == torch.int64 and ids.shape == (9, 5)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(lps, want.values, rtol=1e-6, atol=1e-6)


def test_vocab_size_drops_padded_rows_like_the_op():
    x, w, b = _case(v=30)
    ids, lps = topk_logprobs(x, w, 23, bias=b, vocab_size=23)
    assert int(ids.max()) < 23
    torch.testing.assert_close(lps.exp().sum(-1), torch.ones(9), rtol=1e-5, atol=1e-5)  # renormalised on 23 ids
    # k = V: the sparse teacher is the whole (padded-then-dropped) dense teacher
    s, ws, _ = _case(v=23, seed=1)
    labels = torch.arange(9) % 23
    sparse = fused_linear_kd(s, ws, None, None, labels, teacher_topk=(ids, lps), alpha=1.0)
    dense = fused_linear_kd(s, ws, x, w, labels, teacher_bias=b, alpha=1.0)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be in"),
    (dict(k=24), "k must be in"),
    (dict(k=3, temperature=0.0), "temperature"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    x, w, _ = _case()
    with pytest.raises(ValueError, match=match):
        topk_logprobs(x, w, **kwargs)


def test_dtype_mismatch_raises():
    x, w, _ = _case()
    with pytest.raises(TypeError, match="dtype"):
        topk_logprobs(x, w.double(), 3)
