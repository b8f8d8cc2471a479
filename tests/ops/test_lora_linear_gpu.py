"""lora_linear on a CUDA device (compiled Triton kernels, autotuned): realistic shapes, no host sync, inductor.
Skipped where no GPU is visible; the same kernels run under TRITON_INTERPRET=1 in test_lora_linear.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_error_budget

from tellneo.ops.lora_linear import lora_dropout_mask, lora_linear, lora_linear_reference

pytestmark = pytest.mark.gpu


def inputs(n, d_in, d_out, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale

    return (rnd(n, d_in), rnd(d_out, d_in, scale=d_in**-0.5), rnd(r, d_in, scale=d_in**-0.5),
            rnd(d_out, r, scale=r**-0.5), rnd(d_out), rnd(n, d_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2048, 4096, 4096, 16), (1000, 4096, 14336, 16), (333, 1536, 576, 64),
                                   (129, 200, 300, 256)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_cuda_matches_reference_within_budget(dtype, shape, p):
    n, d_in, d_out, r = shape
    x, w, a, b, bias, dy = inputs(n, d_in, d_out, r, dtype)
    mask = lora_dropout_mask(n, d_in, p, 1234, device="cuda", backend="triton") if p else None

    def grads(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, a, b, bias)]
        y = fn(leaves[0], w.to(dt), leaves[1], leaves[2], leaves[3])
        return [y, *torch.autograd.grad(y, leaves, dy.to(dt))]

    got = grads(lambda x_, w_, a_, b_, bias_: lora_linear(x_, w_, a_, b_, 2.0, bias_, p, seed=1234, backend="triton"),
                dtype)
    ref = grads(lambda *t: lora_linear_reference(*t[:4], 2.0, t[4], mask, p), torch.float64)
    base = grads(lambda *t: lora_linear_reference(*t[:4], 2.0, t[4], mask, p), dtype)
    for name, g_, r_, b_ in zip(("y", "dx", "dA", "dB", "dbias"), got, ref, base):
        assert g_.dtype == dtype
        assert_error_budget(g_, r_, b_, name=name, floor=1e-5)


def test_no_host_sync_with_fresh_seeds():
    x, w, a, b, bias, dy = inputs(512, 1024, 1024, 16, torch.bfloat16)
    x, w, a, b = (t.bfloat16() for t in (x, w, a, b))
    a.requires_grad_()
    b.requires_grad_()
    x.requires_grad_()
    lora_linear(x, w, a, b, 1.0, dropout_p=0.1).sum().backward()  # autotune outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = lora_linear(x, w, a, b, 1.0, dropout_p=0.1)
        y.backward(dy.bfloat16())
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_inductor_fullgraph_on_cuda():
    x, w, a, b, _, _ = inputs(256, 512, 384, 8, torch.bfloat16)
    x, w, a, b = (t.bfloat16() for t in (x, w, a, b))
    a.requires_grad_()
    b.requires_grad_()

    def f(x, a, b):
        return torch.nn.functional.gelu(lora_linear(x, w, a, b, 0.5, dropout_p=0.1, seed=3)).float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x, a, b)
    loss.backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    f(x, a, b).backward()
    torch.testing.assert_close(ga, a.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gb, b.grad, rtol=2e-2, atol=1e-3)


def test_dropout_keep_rate_on_cuda():
    keep = lora_dropout_mask(4096, 4096, 0.1, 7, device="cuda", backend="triton").double().mean().item()
    assert abs(keep - 0.9) < 6 * (0.09 / 4096**2) ** 0.5
