"""fused_linear_kd: divergence math, backends <-> full-logits reference (forward and every gradient), dtypes,
awkward shapes, reductions / gradient accumulation, vocab padding, sparse teachers, custom op and compile.

Triton runs under TRITON_INTERPRET=1 on CPU (slow): its cases use tiny but awkward shapes (N, V, H not multiples
of the interpreter's 16/32/16 tiles); larger vocabularies are exercised through the torch path.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_error_budget, rel_error
from hypothesis import given, settings
from hypothesis import strategies as st

import tellneo.kernels.fused_linear_kd as K
from tellneo._backend import BackendError
from tellneo.ops import KDLossOutput, _kd_torch, _kd_triton, fused_linear_kd, fused_linear_kd_reference
from tellneo.ops import divergences as D

BACKENDS = ["torch", "triton"]


# ------------------------------------------------------------------------------------------------------ helpers


def make_case(n=13, hs=20, ht=24, v=37, vt=None, *, bias=False, teacher_bias=False, topk=None, ignore_every=4,
              labels=True, seed=0, scale=1.0, lead=None):
    """fp64 master tensors of one problem; ``cast(dtype)`` returns fresh leaves (student ones require grad)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    vt = vt or v
    master = dict(
        sh=rnd(n, hs, s=scale), sw=rnd(v, hs, s=hs**-0.5 * 2), sb=rnd(v) if bias else None,
        th=rnd(n, ht, s=scale), tw=rnd(vt, ht, s=ht**-0.5 * 2), tb=rnd(vt) if teacher_bias else None,
    )
    lab = torch.randint(0, v, (n,), generator=g) if labels else None
    if lab is not None and ignore_every:
        lab[::ignore_every] = -100
    ids = lps = None
    if topk:
        full = torch.log_softmax(rnd(n, v) * 2, -1)
        top = full.topk(topk, dim=-1)
        ids, lps = top.indices, top.values
    if lead is not None:
        master = {k: (x.reshape(*lead, x.shape[-1]) if k in ("sh", "th") and x is not None else x)
                  for k, x in master.items()}
        lab = lab.reshape(lead) if lab is not None else None

    def cast(dtype, *, with_teacher=True):
        t = {k: (x.to(dtype) if x is not None else None) for k, x in master.items()}
        for k in ("sh", "sw", "sb"):
            if t[k] is not None:
                t[k].requires_grad_(True)
        args = (t["sh"], t["sw"], t["th"] if with_teacher and not topk else None,
                t["tw"] if with_teacher and not topk else None, lab)
        kw = dict(student_bias=t["sb"])
        if with_teacher and not topk:
            kw["teacher_bias"] = t["tb"]
        if topk and with_teacher:
            kw["teacher_topk"] = (ids, lps.to(dtype))
        return t, args, kw

    return cast


def run(fn, t, args, kw, grad_out=None, **opts):
    out = fn(*args, **kw, **opts)
    leaves = [t[k] for k in ("sh", "sw", "sb") if t[k] is not None]
    if grad_out is None:
        grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=False)
    return [out, *grads]


def backend_fn(backend):
    return lambda *a, **k: fused_linear_kd(*a, **k, backend=backend)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the torch path into several chunks (chunk of 8 rows) even on tiny shapes."""
    monkeypatch.setattr(_kd_torch, "CHUNK_ELEMENTS", 1)


@pytest.fixture
def splits(monkeypatch):
    """Force several vocab splits in the Triton stats kernels (exercises the cross-split merge)."""
    monkeypatch.setattr(K, "FORCE_SPLITS", 3)


# ------------------------------------------------------------------------------------------- divergence math


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
def test_closed_form_gradient_matches_autograd(divergence, beta):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(6, 29, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(6, 29, generator=g, dtype=torch.float64) * 3
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    value = D.kd_per_token(log_q, log_p, divergence, beta)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad(value, s, w)
    lq, lp = log_q.detach(), log_p
    v2, closed, aux = D.kd_per_token_and_grad(lq, lp, divergence, beta)
    torch.testing.assert_close(v2, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed * w[:, None], auto, rtol=1e-10, atol=1e-12)
    assert (value > 0).all()
    # the in-place fast form (buffers reused, probabilities supplied) gives the same numbers and leaves q alone
    q = lq.exp()
    q0 = q.clone()
    v3, g3, aux3 = D.kd_per_token_and_grad(lq.clone(), lp.clone(), divergence, beta, q=q, p=lp.exp(),
                                           scratch=torch.empty_like(q), overwrite=True)
    torch.testing.assert_close(v3, v2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g3, closed, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(aux3, aux, rtol=1e-12, atol=1e-14)
    assert torch.equal(q, q0)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_topk_closed_form_gradient_matches_autograd(divergence, beta):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 40, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(5)])
    lps = torch.log_softmax(torch.randn(5, 40, generator=g, dtype=torch.float64), -1).gather(1, ids)
    lps[1, 4:] = -math.inf  # padding entries
    s_ids = s.gather(1, ids).requires_grad_(True)
    lse = torch.logsumexp(s, -1).requires_grad_(True)
    value = D.topk_kd_per_token(s_ids, lse, lps, divergence, beta)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    a_ids, a_lse = torch.autograd.grad(value, (s_ids, lse), w)
    v2, c_ids, c_lse = D.topk_kd_per_token_and_grad(s_ids.detach(), lse.detach(), lps, divergence, beta)
    torch.testing.assert_close(v2, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_ids * w[:, None], a_ids, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c_lse * w, a_lse, rtol=1e-9, atol=1e-12)
    assert (c_ids[1, 4:] == 0).all(), "padding entries must get no gradient"
    assert (value >= 0).all()


def test_jsd_endpoints_are_exact_kls():
    g = torch.Generator().manual_seed(3)
    log_q = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    log_p = torch.log_softmax(torch.randn(4, 50, generator=g), -1)
    assert torch.equal(D.kd_per_token(log_q, log_p, "jsd", 0.0), D.kd_per_token(log_q, log_p, "forward_kl"))
    assert torch.equal(D.kd_per_token(log_q, log_p, "jsd", 1.0), D.kd_per_token(log_q, log_p, "reverse_kl"))
    # interior beta is the mixture form, which tends to 0 (not to a KL) at the endpoints: the maps are explicit
    assert D.kd_per_token(log_q, log_p, "jsd", 1e-6).max() < 1e-4


def test_topk_with_whole_vocab_equals_dense_teacher():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 11, generator=g, dtype=torch.float64)
    t = torch.randn(3, 11, generator=g, dtype=torch.float64)
    ids = torch.arange(11).expand(3, 11).flip(-1).contiguous()
    lps = torch.log_softmax(t, -1).gather(1, ids)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        dense = D.kd_per_token(torch.log_softmax(s, -1), torch.log_softmax(t, -1), div, 0.4)
        sparse = D.topk_kd_per_token(s.gather(1, ids), torch.logsumexp(s, -1), lps, div, 0.4)
        torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------- reference (fp64 AD)


@pytest.mark.parametrize("opts", [
    dict(divergence="forward_kl", temperature=2.0, softcap=3.0, logit_scale=0.8, t2_scale=True),
    dict(divergence="jsd", beta=0.3),
    dict(divergence="reverse_kl", reduction="none"),
    dict(divergence="jsd", beta=0.7, topk=4),
])
def test_reference_gradcheck_fp64(opts):
    opts = dict(opts)
    cast = make_case(n=4, hs=3, ht=5, v=7, bias=True, topk=opts.pop("topk", None), ignore_every=3)
    t, args, kw = cast(torch.float64)

    def f(sh, sw, sb):
        return fused_linear_kd_reference(sh, sw, *args[2:], **{**kw, "student_bias": sb}, alpha=0.6, **opts)

    assert torch.autograd.gradcheck(f, (t["sh"], t["sw"], t["sb"]), eps=1e-6, atol=1e-7)


def test_per_model_transforms_are_each_models_own_logits():
    """The reference with per-model transforms is CE + KL on each model's own transformed logits, written out
    with torch.nn.functional (independent of tellneo's transform helper): a Gemma-2-like student (softcap 3)
    against a Cohere-like teacher (scale 2.5) and a Granite-like student (1 / 4) against an uncapped teacher."""
    cast = make_case(n=9, v=23, bias=True, teacher_bias=True, scale=3.0)
    for opts, student_fn, teacher_fn in (
        (dict(softcap=3.0, teacher_softcap=None, teacher_logit_scale=2.5),
         lambda z: 3.0 * torch.tanh(z / 3.0), lambda u: u * 2.5),
        (dict(logit_scale=0.25, softcap=None), lambda z: z / 4.0, lambda u: u / 4.0),
        (dict(logit_scale=0.25, teacher_logit_scale=1.0, teacher_softcap=5.0),
         lambda z: z / 4.0, lambda u: 5.0 * torch.tanh(u / 5.0)),
    ):
        t, args, kw = cast(torch.float64)
        got = run(fused_linear_kd_reference, t, args, kw, alpha=0.6, **opts)
        t, args, _ = cast(torch.float64)
        sh, sw, th, tw, lab = args
        z = student_fn(torch.nn.functional.linear(sh, sw, t["sb"]))
        u = teacher_fn(torch.nn.functional.linear(th, tw, t["tb"]))
        valid = lab != -100
        ce = torch.nn.functional.cross_entropy(z[valid], lab[valid], reduction="sum")
        kl = torch.nn.functional.kl_div(torch.log_softmax(z[valid], -1), torch.log_softmax(u[valid], -1),
                                        log_target=True, reduction="sum")
        want = (0.4 * ce + 0.6 * kl) / valid.sum()
        grads = torch.autograd.grad(want, [t["sh"], t["sw"], t["sb"]],
                                    torch.linspace(0.5, 1.5, 1, dtype=torch.float64).reshape(()))
        for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, [want, *grads]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{opts} {name}: {m}")


def test_shared_transform_is_the_default_for_the_teacher():
    cast = make_case(n=7, v=19)
    t, args, kw = cast(torch.float64)
    shared = run(fused_linear_kd_reference, t, args, kw, softcap=2.0, logit_scale=1.5)
    t, args, kw = cast(torch.float64)
    explicit = run(fused_linear_kd_reference, t, args, kw, softcap=2.0, logit_scale=1.5, teacher_softcap=2.0,
                   teacher_logit_scale=1.5)
    t, args, kw = cast(torch.float64)
    other = run(fused_linear_kd_reference, t, args, kw, softcap=2.0, logit_scale=1.5, teacher_softcap=None)
    for a, b in zip(shared, explicit):
        assert torch.equal(a, b)
    assert not torch.allclose(shared[0], other[0])


# ----------------------------------------------------------------------------- torch path <-> reference, fp64

TORCH_OPTS = [
    dict(divergence="forward_kl"),
    dict(divergence="reverse_kl", temperature=0.5),
    dict(divergence="jsd", beta=0.5, temperature=2.0, t2_scale=True),
    dict(divergence="jsd", beta=0.0),
    dict(divergence="jsd", beta=1.0),
    dict(divergence="jsd", beta=0.2, softcap=4.0, logit_scale=1.3),
    dict(divergence="forward_kl", softcap=2.0, temperature=2.0),
    # per-model transforms: a softcapped student with a scaled, uncapped teacher, and the other way round
    dict(divergence="forward_kl", softcap=3.0, teacher_softcap=None, teacher_logit_scale=0.5),
    dict(divergence="reverse_kl", logit_scale=0.7, teacher_softcap=2.5, temperature=1.5),
    dict(divergence="jsd", beta=0.4, softcap=4.0, logit_scale=1.2, teacher_softcap=2.0, teacher_logit_scale=3.0),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["dense", "padded", "topk"])
@pytest.mark.parametrize("opts", TORCH_OPTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_torch_path_matches_reference_fp64(small_chunks, opts, teacher, reduction):
    cast = make_case(n=21, v=37, vt=45 if teacher == "padded" else None, bias=True, teacher_bias=True,
                     topk=5 if teacher == "topk" else None)
    t, args, kw = cast(torch.float64)
    want = run(fused_linear_kd_reference, t, args, kw, reduction=reduction, alpha=0.7, **opts)
    t, args, kw = cast(torch.float64)
    got = run(backend_fn("torch"), t, args, kw, reduction=reduction, alpha=0.7, **opts)
    for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------ backends <-> reference, fp32 budget

TRITON_CASES = [
    # (case kwargs, op kwargs) -- every divergence, transform, teacher kind and reduction at least once
    (dict(), dict(divergence="forward_kl")),
    (dict(bias=True, teacher_bias=True, vt=41), dict(divergence="reverse_kl", temperature=0.5, reduction="sum")),
    (dict(bias=True), dict(divergence="jsd", beta=0.5, temperature=2.0, t2_scale=True, reduction="none")),
    (dict(), dict(divergence="jsd", beta=0.25, softcap=3.0, logit_scale=1.5)),
    (dict(topk=5, bias=True), dict(divergence="forward_kl", temperature=2.0, softcap=5.0)),
    (dict(topk=3), dict(divergence="jsd", beta=0.6, reduction="none")),
    (dict(labels=False), dict(divergence="reverse_kl")),
    (dict(), dict(alpha=0.0, divergence="forward_kl")),
    (dict(), dict(alpha=1.0, divergence="jsd", beta=0.5)),
    # per-model transforms (student and teacher of different families)
    (dict(bias=True, teacher_bias=True), dict(divergence="forward_kl", softcap=3.0, teacher_softcap=None,
                                              teacher_logit_scale=0.6)),
    (dict(), dict(divergence="jsd", beta=0.3, logit_scale=1.4, teacher_softcap=2.0, temperature=2.0)),
    (dict(), dict(divergence="reverse_kl", teacher_logit_scale=2.5, reduction="sum")),
]


def _budget_check(backend, dtype, case_kw, op_kw, *, alpha=0.7):
    op_kw = {"alpha": alpha, **op_kw}
    cast = make_case(**case_kw)
    t, args, kw = cast(torch.float64)
    ref64 = run(fused_linear_kd_reference, t, args, kw, **op_kw)
    t, args, kw = cast(dtype)
    base = run(fused_linear_kd_reference, t, args, kw, **op_kw)
    t, args, kw = cast(dtype)
    got = run(backend_fn(backend), t, args, kw, **op_kw)
    for name, a, r, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, ref64, base):
        assert a.dtype == b.dtype, name
        assert_error_budget(a, r, b, factor=2.0, floor=2e-6, name=name)
    return got, ref64


@pytest.mark.parametrize("case_kw,op_kw", TRITON_CASES, ids=[f"c{i}" for i in range(len(TRITON_CASES))])
def test_triton_matches_reference_fp32(splits, case_kw, op_kw):
    _budget_check("triton", torch.float32, case_kw, op_kw)


@pytest.mark.parametrize("case_kw,op_kw", TRITON_CASES[:4], ids=[f"c{i}" for i in range(4)])
def test_torch_path_matches_reference_fp32(small_chunks, case_kw, op_kw):
    _budget_check("torch", torch.float32, case_kw, op_kw)


def test_triton_and_torch_agree_on_row_stats(splits):
    """The two backends' O(N) statistics (what the backward consumes) agree, not only the losses."""
    cast = make_case(n=19, v=53, bias=True)
    t, args, kw = cast(torch.float32)
    from tellneo.ops._kd_args import check_args

    opts = dict(divergence="jsd", beta=0.4, temperature=1.5, t2_scale=False, alpha=0.5, ignore_index=-100,
                num_items_in_batch=None, softcap=None, logit_scale=1.0, reduction="mean")
    inp, cfg = check_args(*args, student_bias=kw["student_bias"], teacher_bias=None, teacher_topk=None, **opts)
    with torch.no_grad():
        ce_a, kd_a, st_a = _kd_triton.forward(inp, cfg)
        ce_b, kd_b, st_b, _ = _kd_torch.forward(inp, cfg)
    # Triton keeps (max, log S) pairs where torch keeps their sum, the logsumexp; aux is the last column of both
    lse_a = st_a[:, 0:6:2] + st_a[:, 1:6:2]
    torch.testing.assert_close(lse_a, st_b[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_a[:, -1], st_b[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_a, ce_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd_a, kd_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_bf16_within_1e2_of_fp32_reference(backend, divergence):
    cast = make_case(n=17, hs=24, ht=40, v=45, bias=True)
    op_kw = dict(divergence=divergence, temperature=2.0, alpha=0.6)
    t, args, kw = cast(torch.float32)
    ref = run(fused_linear_kd_reference, t, args, kw, **op_kw)
    t, args, kw = cast(torch.bfloat16)
    base = run(fused_linear_kd_reference, t, args, kw, **op_kw)
    t, args, kw = cast(torch.bfloat16)
    got = run(backend_fn(backend), t, args, kw, **op_kw)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, a, r, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, ref, base):
        assert rel_error(a, r) < 1e-2, f"{name}: {rel_error(a, r):.3e}"
        assert_error_budget(a, r, b, factor=2.0, floor=1e-4, name=name)


# ----------------------------------------------------------------------------------------------- awkward cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    _budget_check(backend, torch.float32, dict(n=1, ignore_every=0), dict(divergence="jsd", beta=0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [257, 1000])
def test_vocab_not_power_of_two(backend, v):
    _budget_check(backend, torch.float32, dict(n=5, hs=8, ht=12, v=v), dict(divergence="reverse_kl"))


@pytest.mark.parametrize("v", [49152, 128256])
def test_large_real_vocab_patterns_torch(v):
    _budget_check("torch", torch.float32, dict(n=6, hs=8, ht=4, v=v, bias=True), dict(divergence="jsd"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(backend, reduction):
    cast = make_case(n=6, v=33, bias=True)
    t, args, kw = cast(torch.float32)
    args = (*args[:4], torch.full((6,), -100))
    out = fused_linear_kd(*args, **kw, reduction=reduction, return_parts=True, backend=backend)
    assert torch.isfinite(out.loss).all() and (out.loss == 0).all()
    assert int(out.num_tokens) == 0 and (out.ce == 0).all() and (out.kd == 0).all()
    grads = torch.autograd.grad(out.loss.sum(), (t["sh"], t["sw"], t["sb"]))
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["dense", "topk", "none"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["[0,H]", "[B,0,H]"])
def test_empty_batch_is_a_zero_loss_connected_to_the_weights(backend, teacher, lead):
    """N = 0 (e.g. a rank or micro-batch with no tokens): loss 0 in every reduction, still in the graph of the
    student weights, so backward gives zero gradients of the right shapes (a trainer needs no special case)."""
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(*lead, 8, generator=g, requires_grad=True)
    sw = torch.randn(11, 8, generator=g, requires_grad=True)
    sb = torch.randn(11, generator=g, requires_grad=True)
    th, tw = torch.randn(*lead, 6, generator=g), torch.randn(11, 6, generator=g)
    args, kw = (sh, sw, th, tw, torch.zeros(lead, dtype=torch.long)), dict(student_bias=sb)
    if teacher != "dense":
        args = (sh, sw, None, None, args[4])
    if teacher == "topk":
        kw["teacher_topk"] = (torch.zeros(*lead, 3, dtype=torch.long), torch.full((*lead, 3), -2.0))
    if teacher == "none":
        kw["alpha"] = 0.0
    for reduction, n_items in [("mean", None), ("mean", 4), ("sum", None), ("none", None)]:
        out = fused_linear_kd(*args, **kw, reduction=reduction, num_items_in_batch=n_items, return_parts=True,
                              backend=backend)
        assert out.loss.shape == (lead if reduction == "none" else ()) and out.loss.dtype == torch.float32
        assert out.loss.requires_grad and not out.loss.detach().any() and int(out.num_tokens) == 0
        assert not out.ce.any() and not out.kd.any()
        grads = torch.autograd.grad(out.loss.sum(), (sh, sw, sb))
        for leaf, grad in zip((sh, sw, sb), grads):
            assert grad.shape == leaf.shape and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_valid_token(backend):
    cast = make_case(n=7, v=29, ignore_every=0)
    t, args, kw = cast(torch.float64)
    lab = torch.full((7,), -100)
    lab[3] = 5
    args64 = (*args[:4], lab)
    want = run(fused_linear_kd_reference, t, args64, kw, divergence="jsd")
    t32, args32, kw32 = cast(torch.float32)
    got = run(backend_fn(backend), t32, (*args32[:4], lab), kw32, divergence="jsd")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    assert (got[1][torch.arange(7) != 3] == 0).all(), "ignored rows must get zero d_hidden"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extreme_logits_do_not_overflow(backend, divergence):
    """Logits of order +-1e4 (hidden scaled by 1e3): finite loss and grads, matching the fp64 reference."""
    cast = make_case(n=6, hs=8, ht=8, v=40, scale=3e3, ignore_every=0)
    t, args, kw = cast(torch.float64)
    assert F_logits_max(t) > 5e3
    want = run(fused_linear_kd_reference, t, args, kw, divergence=divergence, temperature=0.5)
    t, args, kw = cast(torch.float32)
    got = run(backend_fn(backend), t, args, kw, divergence=divergence, temperature=0.5)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, b) < 1e-4, f"{name}: {rel_error(a, b):.3e}"


def F_logits_max(t):
    return (t["sh"].detach() @ t["sw"].detach().T).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_temperature_grid_forward(backend, beta, temperature):
    """Forward values over the beta x T grid (gradients of the same formulas are covered above)."""
    cast = make_case(n=9, v=35)
    t, args, kw = cast(torch.float64)
    want = fused_linear_kd_reference(*args, **kw, divergence="jsd", beta=beta, temperature=temperature,
                                     return_parts=True)
    t, args, kw = cast(torch.float32)
    with torch.no_grad():
        got = fused_linear_kd(*args, **kw, divergence="jsd", beta=beta, temperature=temperature,
                              return_parts=True, backend=backend)
    torch.testing.assert_close(got.kd.double(), want.kd, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got.ce.double(), want.ce, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------ reductions, accumulation, parts, shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_matches_one_batch(backend):
    """Two micro-batches divided by the global token count give the big batch's loss and gradients."""
    cast = make_case(n=14, v=31, bias=True, ignore_every=3)
    t, args, kw = cast(torch.float64 if backend == "torch" else torch.float32)
    big = run(backend_fn(backend), t, args, kw, grad_out=torch.tensor(1.0), divergence="jsd")
    lab = args[4]
    total = torch.tensor(int((lab != -100).sum()))
    acc = None
    for sl in (slice(0, 5), slice(5, 14)):
        part_args = (args[0][sl], args[1], args[2][sl], args[3], lab[sl])
        out = fused_linear_kd(*part_args, **kw, divergence="jsd", num_items_in_batch=total, backend=backend)
        grads = torch.autograd.grad(out, (t["sh"], t["sw"], t["sb"]))
        cur = [out.detach(), *grads]
        acc = cur if acc is None else [a + b for a, b in zip(acc, cur)]
    for a, b in zip(acc, big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_parts_are_consistent(backend):
    cast = make_case(n=10, v=23)
    t, args, kw = cast(torch.float32)
    common = dict(divergence="forward_kl", alpha=0.3, temperature=2.0, t2_scale=True, backend=backend)
    with torch.no_grad():
        none = fused_linear_kd(*args, **kw, reduction="none", return_parts=True, **common)
        mean = fused_linear_kd(*args, **kw, reduction="mean", return_parts=True, **common)
        summ = fused_linear_kd(*args, **kw, reduction="sum", return_parts=True, **common)
        n_items = fused_linear_kd(*args, **kw, num_items_in_batch=4, **common)
    valid = args[4] != -100
    assert isinstance(mean, KDLossOutput) and int(mean.num_tokens) == int(valid.sum())
    assert (none.loss[~valid] == 0).all() and (none.kd[~valid] == 0).all()
    torch.testing.assert_close(none.loss, 0.7 * none.ce + 0.3 * none.kd)
    torch.testing.assert_close(summ.loss, none.loss.sum())
    torch.testing.assert_close(mean.loss, summ.loss / valid.sum())
    torch.testing.assert_close(mean.loss, 0.7 * mean.ce + 0.3 * mean.kd)
    torch.testing.assert_close(n_items, summ.loss / 4)
    assert not mean.ce.requires_grad and not mean.kd.requires_grad


def test_parts_are_detached_but_loss_is_not():
    cast = make_case(n=5, v=17)
    t, args, kw = cast(torch.float32)
    out = fused_linear_kd(*args, **kw, return_parts=True)
    assert out.loss.requires_grad and not out.ce.requires_grad and not out.kd.requires_grad
    assert out.num_tokens.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_are_flattened(backend):
    cast = make_case(n=12, v=19, lead=(3, 4))
    t, args, kw = cast(torch.float32)
    assert args[0].shape == (3, 4, 20)
    per_tok = fused_linear_kd(*args, **kw, reduction="none", backend=backend)
    assert per_tok.shape == (3, 4)
    flat = fused_linear_kd(args[0].reshape(12, 20), args[1], args[2].reshape(12, 24), args[3], args[4].reshape(12),
                           **kw, reduction="none", backend=backend)
    torch.testing.assert_close(per_tok.reshape(12), flat)
    (g,) = torch.autograd.grad(per_tok.sum(), t["sh"])
    assert g.shape == (3, 4, 20) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_teacher_vocab_is_dropped_and_renormalised(backend):
    """Vt > V: the extra teacher rows do not matter at all; equal to the teacher truncated to V."""
    cast = make_case(n=8, v=21, vt=32, teacher_bias=True)
    t, args, kw = cast(torch.float32)
    with torch.no_grad():
        a = fused_linear_kd(*args, **kw, divergence="jsd", backend=backend)
        args2 = (*args[:3], args[3][:21].clone(), args[4])
        kw2 = {**kw, "teacher_bias": kw["teacher_bias"][:21].clone()}
        b = fused_linear_kd(*args2, **kw2, divergence="jsd", backend=backend)
        tw = args[3].clone()
        tw[21:] = 1e3 * torch.randn(11, tw.shape[1])  # garbage in the padded rows changes nothing
        c = fused_linear_kd(*args[:3], tw, args[4], **kw, divergence="jsd", backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_none_means_all_rows_kd_and_no_ce(backend):
    cast = make_case(n=6, v=19, labels=False)
    t, args, kw = cast(torch.float64 if backend == "torch" else torch.float32)
    out = fused_linear_kd(*args, **kw, alpha=0.4, return_parts=True, backend=backend)
    assert out.ce == 0 and int(out.num_tokens) == 6
    torch.testing.assert_close(out.loss.detach(), 0.4 * out.kd)


def test_ce_only_matches_cross_entropy():
    cast = make_case(n=9, v=27, bias=True)
    t, args, kw = cast(torch.float64)
    loss = fused_linear_kd(args[0], args[1], None, None, args[4], student_bias=t["sb"], alpha=0.0)
    want = torch.nn.functional.cross_entropy(args[0] @ args[1].T + t["sb"], args[4], ignore_index=-100)
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_teacher_padding_entries_drop_out(backend):
    cast = make_case(n=6, v=25, topk=4)
    t, args, kw = cast(torch.float32)
    ids, lps = kw["teacher_topk"]
    lps_pad = torch.cat([lps, torch.full((6, 2), -math.inf)], 1)
    ids_pad = torch.cat([ids, ids[:, :2]], 1)  # duplicate ids are fine in padding slots
    with torch.no_grad():
        a = fused_linear_kd(*args, **kw, backend=backend)
        b = fused_linear_kd(*args, **{**kw, "teacher_topk": (ids_pad, lps_pad)}, backend=backend)
    torch.testing.assert_close(a, b)


def test_teacher_receives_no_gradient():
    cast = make_case(n=5, v=13)
    t, args, kw = cast(torch.float32)
    th = args[2].clone().requires_grad_(True)
    loss = fused_linear_kd(args[0], args[1], th, args[3], args[4], **kw)
    loss.backward()
    assert th.grad is None and t["sh"].grad is not None


def test_frozen_weight_gets_no_gradient_and_is_not_computed():
    cast = make_case(n=5, v=13)
    t, args, kw = cast(torch.float32)
    w = args[1].detach()
    loss = fused_linear_kd(args[0], w, *args[2:], **kw)
    (g,) = torch.autograd.grad(loss, t["sh"])
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------------------------- dispatch / compile


def test_auto_backend_is_torch_on_cpu_and_env_override(monkeypatch):
    from tellneo.ops.fused_linear_kd import _choose
    from tellneo.ops._kd_args import check_args

    cast = make_case(n=3, v=7)
    t, args, kw = cast(torch.float32)
    inp, _ = check_args(*args, student_bias=None, teacher_bias=None, teacher_topk=None, divergence="jsd", beta=0.5,
                        temperature=1.0, t2_scale=False, alpha=0.5, ignore_index=-100, num_items_in_batch=None,
                        softcap=None, logit_scale=1.0, reduction="mean")
    monkeypatch.delenv("TELLNEO_BACKEND", raising=False)
    assert _choose(inp, "auto") == "torch"
    monkeypatch.setenv("TELLNEO_BACKEND", "triton")
    assert _choose(inp, "auto") == "triton"  # interpreter is on in the test session
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        _choose(inp, "triton")
    with pytest.raises(BackendError, match="not implemented"):
        _choose(inp, "cpp")


def test_float64_is_rejected_by_triton_backend():
    cast = make_case(n=3, v=7)
    t, args, kw = cast(torch.float64)
    with pytest.raises(BackendError, match="float64"):
        fused_linear_kd(*args, **kw, backend="triton")


@pytest.mark.parametrize("fused", [True, False])
def test_opcheck_torch_backend(fused):
    cast = make_case(n=6, hs=5, ht=7, v=11, bias=True)
    t, args, kw = cast(torch.float32)
    sh, sw, th, tw, lab = args
    op_args = (sh, sw, t["sb"], th, tw, None, lab, None, None, torch.tensor(0.2), "jsd", 0.4, 2.0, 4.0, 0.5, -100,
               3.0, 1.0, 2.0, 1.5, "torch", True, True, True, fused)
    torch.library.opcheck(torch.ops.tellneo.fused_linear_kd_fwd.default, op_args)


def test_opcheck_triton_backend(splits):
    cast = make_case(n=5, hs=5, ht=7, v=11)
    t, args, kw = cast(torch.float32)
    sh, sw, th, tw, lab = args
    op_args = (sh, sw, None, th, tw, None, lab, None, None, torch.tensor(0.2), "reverse_kl", 0.5, 1.0, 1.0, 0.5,
               -100, None, 1.0, 2.0, 0.5, "triton", True, True, False, False)
    torch.library.opcheck(torch.ops.tellneo.fused_linear_kd_fwd.default, op_args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_no_graph_break():
    cast = make_case(n=8, v=17, bias=True)
    t, args, kw = cast(torch.float32)

    def f(sh, sw, sb, th, tw, lab):
        return fused_linear_kd(sh, sw, th, tw, lab, student_bias=sb, divergence="jsd", temperature=2.0,
                               backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(t["sh"], t["sw"], t["sb"], *args[2:])
    want = f(t["sh"], t["sw"], t["sb"], *args[2:])
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (t["sh"], t["sw"], t["sb"]))
    g_want = torch.autograd.grad(want, (t["sh"], t["sw"], t["sb"]))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gpu_triton_matches_reference_bf16_without_host_sync(divergence):
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    n, hs, ht, v = 1000, 256, 384, 32003
    sh = (torch.randn(n, hs, generator=g) * 0.5).to(dev, torch.bfloat16).requires_grad_(True)
    sw = (torch.randn(v, hs, generator=g) * hs**-0.5 * 3).to(dev, torch.bfloat16).requires_grad_(True)
    th = torch.randn(n, ht, generator=g).to(dev, torch.bfloat16)
    tw = (torch.randn(v + 61, ht, generator=g) * ht**-0.5 * 3).to(dev, torch.bfloat16)
    lab = torch.randint(0, v, (n,), generator=g).to(dev)
    lab[::7] = -100
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_kd(sh, sw, th, tw, lab, divergence=divergence, temperature=2.0, backend="triton")
        dh, dw = torch.autograd.grad(loss, (sh, sw))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sh32, sw32 = sh.detach().float().requires_grad_(True), sw.detach().float().requires_grad_(True)
    ref = fused_linear_kd_reference(sh32, sw32, th.float(), tw.float(), lab, divergence=divergence, temperature=2.0)
    rdh, rdw = torch.autograd.grad(ref, (sh32, sw32))
    assert rel_error(loss, ref) < 1e-2
    assert rel_error(dh, rdh) < 1e-2 and rel_error(dw, rdw) < 1e-2


# ------------------------------------------------------------------------------------- usage patterns / policies


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_shift_usage_with_non_contiguous_slices(backend):
    """The documented caller pattern: hidden[:, :-1] predicts labels[:, 1:] (non-contiguous [B, T-1, H] views)."""
    g = torch.Generator().manual_seed(5)
    b, t, hs, ht, v = 2, 7, 12, 16, 23
    h_s = torch.randn(b, t, hs, generator=g, requires_grad=True)
    h_t = torch.randn(b, t, ht, generator=g)
    ws, wt = torch.randn(v, hs, generator=g) * 0.3, torch.randn(v, ht, generator=g) * 0.3
    ids = torch.randint(0, v, (b, t), generator=g)
    ids[0, :2] = -100
    got = fused_linear_kd(h_s[:, :-1], ws, h_t[:, :-1], wt, ids[:, 1:], backend=backend)
    (g_got,) = torch.autograd.grad(got, h_s)
    want = fused_linear_kd_reference(h_s[:, :-1].contiguous(), ws, h_t[:, :-1].contiguous(), wt,
                                     ids[:, 1:].contiguous())
    (g_want,) = torch.autograd.grad(want, h_s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert (g_got[:, -1] == 0).all(), "the last position predicts nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_in_another_dtype(backend):
    """A bf16 teacher with an fp32 student: the teacher logits are computed in bf16 (as its lm_head would)."""
    cast = make_case(n=9, v=31)
    t32, args32, kw32 = cast(torch.float32)
    th16, tw16 = args32[2].to(torch.bfloat16), args32[3].to(torch.bfloat16)
    got = run(backend_fn(backend), t32, (args32[0], args32[1], th16, tw16, args32[4]), kw32, divergence="jsd")
    t32b, args, kw = cast(torch.float32)
    want = run(fused_linear_kd_reference, t32b, (args[0], args[1], th16.float(), tw16.float(), args[4]), kw,
               divergence="jsd")
    for a, b in zip(got, want):
        assert rel_error(a, b) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_nan_in_a_valid_row_propagates(backend):
    """Documented policy: inputs are not scanned; a NaN hidden state in a counted row makes the loss NaN."""
    cast = make_case(n=6, v=19, ignore_every=0)
    t, args, kw = cast(torch.float32)
    sh = args[0].detach().clone()
    sh[2, 0] = float("nan")
    with torch.no_grad():
        loss = fused_linear_kd(sh, *args[1:], **kw, backend=backend)
    assert torch.isnan(loss)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 19), hs=st.integers(1, 9), ht=st.integers(1, 9), v=st.integers(2, 70), pad=st.integers(0, 5),
    divergence=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]), beta=st.sampled_from([0.0, 0.3, 1.0]),
    temperature=st.sampled_from([0.5, 1.0, 3.0]), alpha=st.sampled_from([0.0, 0.4, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]), softcap=st.sampled_from([None, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_property_torch_path_equals_reference_fp64(n, hs, ht, v, pad, divergence, beta, temperature, alpha,
                                                    reduction, softcap, seed):
    cast = make_case(n=n, hs=hs, ht=ht, v=v, vt=v + pad, bias=True, seed=seed, ignore_every=3)
    opts = dict(divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, reduction=reduction,
                softcap=softcap)
    t, args, kw = cast(torch.float64)
    want = run(fused_linear_kd_reference, t, args, kw, **opts)
    t, args, kw = cast(torch.float64)
    old = _kd_torch.CHUNK_ELEMENTS
    _kd_torch.CHUNK_ELEMENTS = 1  # several chunks
    try:
        got = run(backend_fn("torch"), t, args, kw, **opts)
    finally:
        _kd_torch.CHUNK_ELEMENTS = old
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------- GPU compile check that needs no GPU

_COMPILE_SM90 = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import tellneo.kernels.fused_linear_kd as K

PTR32 = {"part_ptr", "stats_ptr", "wce_ptr", "wkd_ptr", "glse_ptr", "dh_ptr", "dw_ptr", "db_ptr"}
SCALARS = {"N": "i32", "V": "i32", "HS": "i32", "HT": "i32", "stride_sh": "i32", "stride_sw": "i32",
           "stride_th": "i32", "stride_tw": "i32", "v_per_split": "i32", "inv_temp": "fp32", "logit_scale": "fp32",
           "softcap": "fp32", "t_logit_scale": "fp32", "t_softcap": "fp32", "beta": "fp32", "log_1mb": "fp32", "log_b": "fp32"}
CASES = [
    ("_kd_stats_kernel", dict(HAS_LABELS=True, HAS_KD=True, HAS_TEACHER=True, SAME_T=False, DIV=0)),
    ("_kd_jsd_kernel", {}),
    ("_kd_bwd_kernel", dict(CE_GRAD=True, KD_DENSE=True, KD_TOPK=False, DIV=2, NEED_DH=True, NEED_DW=True,
                            NEED_DB=True)),
]
for kernel, flags in CASES:
    fn = getattr(K, kernel)
    consts = dict(HAS_SB=True, HAS_TB=True, HAS_SOFTCAP=True, HAS_TSOFTCAP=True, PRECISION_S=None, PRECISION_T=None, UPCAST=False,
                  BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, **flags)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        else:
            sig[name] = "*i64" if name == "labels_ptr" else "*fp32" if name in PTR32 else "*bf16"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items() if k in fn.arg_names})
    out = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "ptx" in out.asm, kernel
    print(kernel, "shared", out.metadata.shared)
    assert out.metadata.shared <= 228 * 1024, kernel
"""


def test_kernels_compile_for_sm90_bf16():
    """The interpreter accepts code the compiler rejects (e.g. non-constexpr globals, which it did): compile the
    kernels for sm_90 through Triton's bundled ptxas, which needs no GPU. Runs in a child process because this
    session's kernels were created in interpreter mode. ~15 s cold, ~5 s with a warm ~/.triton/cache."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                          timeout=240)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("shared") == 3, proc.stdout


def test_torch_fused_mode_second_backward_raises_instead_of_wrong_grads():
    """mean/sum on the torch backend scale their precomputed gradients in place: a second backward through a
    retained graph must fail loudly; reduction='none' (recompute mode) supports it."""
    cast = make_case(n=7, v=19)
    t, args, kw = cast(torch.float32)
    loss = fused_linear_kd(*args, **kw, backend="torch")
    (g1,) = torch.autograd.grad(3.0 * loss, t["sw"], retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, t["sw"])
    per_tok = fused_linear_kd(*args, **kw, reduction="none", backend="torch")
    valid = (args[4] != -100).sum()
    (a,) = torch.autograd.grad(per_tok.sum() / valid, t["sw"], retain_graph=True)
    (b,) = torch.autograd.grad(per_tok.sum() / valid, t["sw"])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(3.0 * a, g1)
