"""fused_linear_kd: bad input raises a clear ValueError/TypeError naming the argument (same for the reference)."""

from __future__ import annotations

import pytest
import torch

from tellneo.ops import fused_linear_kd, fused_linear_kd_reference

N, HS, HT, V = 6, 8, 12, 17


def good():
    g = torch.Generator().manual_seed(0)
    return dict(
        student_hidden=torch.randn(N, HS, generator=g),
        student_weight=torch.randn(V, HS, generator=g),
        teacher_hidden=torch.randn(N, HT, generator=g),
        teacher_weight=torch.randn(V, HT, generator=g),
        labels=torch.randint(0, V, (N,), generator=g),
    )


def call(fn, **over):
    a = good()
    a.update(over)
    pos = [a.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")]
    return fn(*pos, **a)


def topk(k=3, n=N):
    return (torch.zeros(n, k, dtype=torch.long) + torch.arange(k), torch.full((n, k), -2.0))


BAD = [
    # (overrides, exception, text that must appear in the message)
    (dict(student_hidden=torch.randn(HS)), ValueError, "student_hidden"),
    (dict(student_hidden=torch.randint(0, 3, (N, HS))), TypeError, "student_hidden"),
    (dict(student_hidden=[[1.0]]), TypeError, "student_hidden"),
    (dict(student_weight=torch.randn(V, HS + 1)), ValueError, "student_weight"),
    (dict(student_weight=torch.randn(V, HS, dtype=torch.float64)), TypeError, "student_weight"),
    (dict(student_weight=torch.randn(0, HS)), ValueError, "student_weight"),
    (dict(student_bias=torch.randn(V + 1)), ValueError, "student_bias"),
    (dict(student_bias=torch.randn(V, dtype=torch.float64)), TypeError, "student_bias"),
    (dict(teacher_hidden=torch.randn(N + 1, HT)), ValueError, "teacher_hidden"),
    (dict(teacher_weight=torch.randn(V, HT + 2)), ValueError, "teacher_weight"),
    (dict(teacher_weight=torch.randn(V - 1, HT)), ValueError, "smaller than the student"),
    (dict(teacher_weight=torch.randn(V, HT, dtype=torch.float64)), TypeError, "teacher_weight"),
    (dict(teacher_weight=None), ValueError, "teacher_weight"),
    (dict(teacher_hidden=None), ValueError, "teacher_hidden"),
    (dict(teacher_bias=torch.randn(V + 3)), ValueError, "teacher_bias"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=torch.randn(V)), ValueError, "teacher_bias"),
    (dict(teacher_topk=topk()), ValueError, "teacher_topk"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.zeros(N, 3, dtype=torch.long),)),
     TypeError, "teacher_topk"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(topk()[0], torch.zeros(N, 4))), ValueError,
     "logprobs"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=topk(n=N - 1)), ValueError, "ids"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(topk()[0] + V, topk()[1])), ValueError, "ids"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(topk()[0].float(), topk()[1])), TypeError, "ids"),
    (dict(labels=torch.randint(0, V, (N + 1,))), ValueError, "labels"),
    (dict(labels=torch.randint(0, V, (N,)).float()), TypeError, "labels"),
    (dict(labels=torch.full((N,), V)), ValueError, "labels"),
    (dict(labels=torch.full((N,), -5)), ValueError, "labels"),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, "alpha"),
    (dict(teacher_hidden=None, teacher_weight=None, labels=None, alpha=0.0), ValueError, "labels"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=float("nan")), TypeError, "beta"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), TypeError, "softcap"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale"),
    (dict(teacher_softcap=-2.0), ValueError, "teacher_softcap"),
    (dict(teacher_softcap="same"), TypeError, "teacher_softcap"),
    (dict(teacher_logit_scale=0.0), ValueError, "teacher_logit_scale"),
    (dict(teacher_logit_scale=None), TypeError, "teacher_logit_scale"),
    (dict(t2_scale=1), TypeError, "t2_scale"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=8, reduction="sum"), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch="8"), TypeError, "num_items_in_batch"),
]


@pytest.mark.parametrize("fn", [fused_linear_kd, fused_linear_kd_reference], ids=["op", "reference"])
@pytest.mark.parametrize("over,exc,text", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(fn, over, exc, text):
    with pytest.raises(exc, match=text):
        call(fn, **over)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        call(fused_linear_kd, backend="cuda-fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device to mismatch")
def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match="teacher_hidden"):
        call(fused_linear_kd, teacher_hidden=torch.randn(N, HT, device="cuda"))


def test_device_mismatch_is_named_meta():
    # a meta tensor is another device even without a GPU
    with pytest.raises(ValueError, match="student_weight"):
        call(fused_linear_kd, student_weight=torch.randn(V, HS, device="meta"))


def test_good_input_passes():
    out = call(fused_linear_kd)
    assert out.shape == () and torch.isfinite(out)
