"""fused_linear_kd against independent peers on CPU: TRL's ``generalized_jsd_loss`` (the KD term and its beta
convention) and Liger's ``LigerFusedLinearJSDLoss`` (CE + JSD with its weighting and temperature convention)."""

from __future__ import annotations

import os

import pytest
import torch

from tellneo.ops import fused_linear_kd, fused_linear_kd_reference

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _inputs(n=11, hs=12, ht=20, v=29, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g, dtype=dtype)
    sw = torch.randn(v, hs, generator=g, dtype=dtype) * hs**-0.5 * 2
    sb = torch.randn(v, generator=g, dtype=dtype)
    th = torch.randn(n, ht, generator=g, dtype=dtype)
    tw = torch.randn(v, ht, generator=g, dtype=dtype) * ht**-0.5 * 2
    tb = torch.randn(v, generator=g, dtype=dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::3] = -100
    return sh, sw, sb, th, tw, tb, lab


@pytest.fixture(scope="module")
def trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
def test_kd_part_matches_trl_generalized_jsd(trl_jsd, beta, temperature):
    sh, sw, sb, th, tw, tb, lab = _inputs()
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    s_logits = sh @ sw.T + sb
    t_logits = th @ tw.T + tb
    want = trl_jsd(s_logits[None], t_logits[None], labels=lab[None], beta=beta, temperature=temperature,
                   reduction="batchmean")
    w_dh, w_dw = torch.autograd.grad(want, (sh, sw))
    for fn in (fused_linear_kd_reference, lambda *a, **k: fused_linear_kd(*a, **k, backend="torch")):
        got = fn(sh, sw, th, tw, lab, student_bias=sb, teacher_bias=tb, divergence="jsd", beta=beta,
                 temperature=temperature, alpha=1.0)
        g_dh, g_dw = torch.autograd.grad(got, (sh, sw))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_dh, w_dh, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_dw, w_dw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_trl_endpoints_are_our_named_kls(trl_jsd, beta):
    sh, sw, sb, th, tw, tb, lab = _inputs(seed=1)
    want = trl_jsd((sh @ sw.T)[None], (th @ tw.T)[None], labels=lab[None], beta=beta, temperature=1.0)
    name = "forward_kl" if beta == 0.0 else "reverse_kl"
    got = fused_linear_kd(sh, sw, th, tw, lab, divergence=name, alpha=1.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_trl_num_items_in_batch(trl_jsd):
    sh, sw, sb, th, tw, tb, lab = _inputs(seed=2)
    want = trl_jsd((sh @ sw.T)[None], (th @ tw.T)[None], labels=lab[None], beta=0.3, num_items_in_batch=40)
    got = fused_linear_kd(sh, sw, th, tw, lab, divergence="jsd", beta=0.3, alpha=1.0, num_items_in_batch=40)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def liger_jsd():
    mod = pytest.importorskip("liger_kernel.chunked_loss")
    return mod.LigerFusedLinearJSDLoss


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("alpha,beta,temperature", [(0.5, 0.5, 1.0), (0.8, 0.2, 2.0), (0.3, 0.0, 0.5),
                                                    (1.0, 1.0, 1.0)])
def test_matches_liger_fused_linear_jsd(liger_jsd, backend, alpha, beta, temperature):
    """Liger: ``w_hard * CE_mean + w_soft * JSD_mean`` over non-ignored tokens, JSD on logits / T (no T^2), CE
    untempered -- i.e. ours with ``alpha = w_soft``, ``1 - alpha = w_hard``, ``t2_scale=False``."""
    sh, sw, sb, th, tw, tb, lab = _inputs(n=23, v=41, dtype=torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    liger = liger_jsd(weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=beta, temperature=temperature,
                      compiled=False, chunk_size=8, return_soft_hard_loss=True)
    w_loss, w_soft, w_hard = liger(leaves[0], leaves[1], th, tw, lab, leaves[2], tb)
    w_grads = torch.autograd.grad(w_loss, leaves)
    mine = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = fused_linear_kd(mine[0], mine[1], th, tw, lab, student_bias=mine[2], teacher_bias=tb, divergence="jsd",
                          beta=beta, temperature=temperature, alpha=alpha, return_parts=True, backend=backend)
    g_grads = torch.autograd.grad(out.loss, mine)
    torch.testing.assert_close(out.loss, w_loss, rtol=2e-5, atol=1e-6)
    # Liger's parts are already divided by the token count but not weighted
    torch.testing.assert_close(out.kd, w_soft, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, w_hard, rtol=2e-5, atol=1e-6)
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), g_grads, w_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
