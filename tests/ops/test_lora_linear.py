"""lora_linear: backends ↔ fp64 reference ↔ PEFT, gradients, dropout regeneration, shapes, bad input, compile."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_error_budget

from tellneo._backend import BackendError
from tellneo.ops.lora_linear import lora_dropout_mask, lora_linear, lora_linear_reference

# Triton runs under TRITON_INTERPRET=1 on CPU (slow): its cases use small shapes.
BACKENDS = ["torch", "triton"]


def make_inputs(n, d_in, d_out, r, dtype, device="cpu", *, bias=True, lead=(), seed=0, weight_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    x = rnd(*lead, n, d_in)
    w = rnd(d_out, d_in, scale=d_in**-0.5)
    a = rnd(r, d_in, scale=d_in**-0.5)
    b = rnd(d_out, r, scale=r**-0.5)
    bb = rnd(d_out) if bias else None
    dy = rnd(*lead, n, d_out)
    leaves = dict(x=x, weight=w, lora_A=a, lora_B=b, bias=bb)
    grad_names = ["x", "lora_A", "lora_B"] + (["bias"] if bias else []) + (["weight"] if weight_grad else [])

    def cast(dt):
        out = {k: (v.to(dt).requires_grad_(k in grad_names) if v is not None else None) for k, v in leaves.items()}
        return out

    return cast, dy, grad_names


def run(fn, tensors, dy, grad_names, **kw):
    y = fn(tensors["x"], tensors["weight"], tensors["lora_A"], tensors["lora_B"], bias=tensors["bias"], **kw)
    grads = torch.autograd.grad(y, [tensors[k] for k in grad_names], dy.to(y.dtype))
    return y, dict(zip(grad_names, grads))


def reference(t, scaling, mask=None, p=0.0):
    return lambda x, w, a, b, bias: lora_linear_reference(x, w, a, b, scaling, bias, dropout_mask=mask, dropout_p=p)


def check_against_reference(backend, dtype, n, d_in, d_out, r, *, p=0.0, seed=7, lead=(), bias=True,
                            weight_grad=False, scaling=2.0):
    cast, dy, names = make_inputs(n, d_in, d_out, r, dtype, lead=lead, bias=bias, weight_grad=weight_grad)
    rows = int(torch.tensor(lead).prod().item() if lead else 1) * n
    mask = None
    if p > 0:
        mask = lora_dropout_mask(rows, d_in, p, seed, backend=backend, dtype=dtype).reshape(*lead, n, d_in)
    t = cast(dtype)
    y, grads = run(lambda *a, **k: lora_linear(*a, scaling=scaling, dropout_p=p, seed=seed, backend=backend, **k),
                   t, dy, names)
    t64 = cast(torch.float64)
    y64, grads64 = run(lambda x, w, a, b, bias: lora_linear_reference(x, w, a, b, scaling, bias, mask, p),
                       t64, dy, names)
    tb = cast(dtype)
    yb, gradsb = run(lambda x, w, a, b, bias: lora_linear_reference(x, w, a, b, scaling, bias, mask, p),
                     tb, dy, names)
    assert y.dtype == dtype and y.shape == (*lead, n, d_out)
    assert_error_budget(y, y64, yb, name="y", floor=1e-6 if dtype == torch.float32 else 1e-4)
    for k in names:
        assert grads[k].dtype == dtype, k
        assert_error_budget(grads[k], grads64[k], gradsb[k], name=f"d{k}",
                            floor=1e-6 if dtype == torch.float32 else 1e-4)
    return t


# ---------------------------------------------------------------------------------------------------------------
# the reference against an independent peer (PEFT) and itself (gradcheck)


def peft_linear(d_in, d_out, r, alpha, dtype, *, bias=True):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=bias)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False)
    layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=alpha)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_matches_peft_lora_linear(dtype, backend):
    layer = peft_linear(40, 24, 4, 8, dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = layer.base_layer.weight, layer.base_layer.bias
    W.requires_grad_(False)
    x = torch.randn(2, 9, 40, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 9, 24, dtype=dtype)
    y_peft = layer(x)
    g_peft = torch.autograd.grad(y_peft, (x, A, B, b), dy)
    if backend == "reference":
        y = lora_linear_reference(x, W, A, B, layer.scaling["default"], b)
    else:
        y = lora_linear(x, W, A, B, layer.scaling["default"], bias=b, backend=backend)
    g = torch.autograd.grad(y, (x, A, B, b), dy)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_peft, **tol)
    for name, a, e in zip(("x", "A", "B", "bias"), g, g_peft):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"d{name}: {m}")


def test_reference_gradcheck_fp64():
    cast, _, _ = make_inputs(5, 7, 6, 3, torch.float64, lead=(2,), weight_grad=True)
    t = cast(torch.float64)
    t["weight"].requires_grad_(True)
    mask = torch.rand(2, 5, 7, dtype=torch.float64) > 0.3
    assert torch.autograd.gradcheck(
        lambda x, w, a, b, bias: lora_linear_reference(x, w, a, b, 0.7, bias, mask, 0.3),
        (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"]),
    )


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_backend_gradcheck_fp64(p):
    cast, _, _ = make_inputs(6, 7, 5, 2, torch.float64, lead=(2,), weight_grad=True)
    t = cast(torch.float64)
    t["weight"].requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, a, b, bias: lora_linear(x, w, a, b, 1.5, bias, p, seed=11, backend="torch"),
        (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# backends against the fp64 reference (error budget: <= 2x plain same-dtype PyTorch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, p, dtype):
    check_against_reference(backend, dtype, 45, 72, 56, 8, p=p, lead=(2,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_only_when_required(backend):
    cast, dy, names = make_inputs(9, 20, 12, 3, torch.float32)
    t = cast(torch.float32)
    y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0, bias=t["bias"], backend=backend)
    y.backward(dy.float())
    assert t["weight"].grad is None and t["lora_A"].grad is not None
    check_against_reference(backend, torch.float32, 9, 20, 12, 3, weight_grad=True, p=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",  # (lead, n, d_in, d_out, r)
    [((), 13, 24, 20, 1), ((), 11, 16, 24, 9), ((), 7, 1, 9, 1), ((), 7, 9, 1, 2), ((3,), 1, 17, 19, 4),
     ((2, 2), 3, 33, 18, 5), ((), 1, 40, 33, 3)],
    ids=["rank1", "rank>in/4", "in=1", "out=1", "N=1-3d", "4d", "N=1"],
)
def test_awkward_shapes(backend, shape):
    lead, n, d_in, d_out, r = shape
    check_against_reference(backend, torch.float32, n, d_in, d_out, r, lead=lead, p=0.1, bias=d_out % 2 == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_1d_input_and_empty_batch(backend):
    w, a, b = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    x = torch.randn(4)
    y = lora_linear(x, w, a, b, 0.5, backend=backend)
    assert y.shape == (5,)
    torch.testing.assert_close(y, lora_linear_reference(x, w, a, b, 0.5))
    y0 = lora_linear(torch.randn(0, 3, 4), w, a, b, 0.5, backend=backend)
    assert y0.shape == (0, 3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["[0,in]", "[B,0,in]"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_empty_batch_like_peft(backend, dtype, lead, p):
    """No rows: an empty output of the right shape and dtype, connected to the adapter weights, so backward
    gives zero gradients for lora_A / lora_B / bias / x exactly as PEFT's own layer does (not missing ones)."""
    layer = peft_linear(12, 7, 3, 6, dtype)
    layer.lora_dropout["default"] = torch.nn.Dropout(p)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(*lead, 12, dtype=dtype, requires_grad=True)
    y_peft = layer(x)
    g_peft = torch.autograd.grad(y_peft.sum(), (x, A, B, b, W))
    y = lora_linear(x, W, A, B, layer.scaling["default"], bias=b, dropout_p=p, backend=backend)
    assert y.shape == y_peft.shape == (*lead, 7) and y.dtype == y_peft.dtype == dtype
    assert y.requires_grad
    g = torch.autograd.grad(y.sum(), (x, A, B, b, W))
    for name, a, e in zip(("x", "A", "B", "bias", "W"), g, g_peft):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e) and not a.any(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_is_handled(backend):
    x = torch.randn(16, 24).t()  # [24, 16], non-contiguous
    assert not x.is_contiguous()
    w, a, b = torch.randn(10, 16), torch.randn(3, 16), torch.randn(10, 3)
    y = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=3, backend=backend)
    y_c = lora_linear(x.contiguous(), w, a, b, 1.0, dropout_p=0.5, seed=3, backend=backend)
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    wt = torch.randn(16, 10).t()  # non-contiguous weight
    torch.testing.assert_close(lora_linear(x, wt, a, b, 1.0, backend=backend),
                               lora_linear_reference(x, wt, a, b, 1.0), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_the_one_used_forward_and_backward(backend):
    """Forward and all gradients equal the reference fed lora_dropout_mask(seed): if the backward regenerated
    a different mask, dx and dA would differ (checked to be sensitive below)."""
    t = check_against_reference(backend, torch.float32, 30, 40, 24, 4, p=0.4, seed=1234)
    m1 = lora_dropout_mask(30, 40, 0.4, 1234, backend=backend)
    m2 = lora_dropout_mask(30, 40, 0.4, 1235, backend=backend)
    x, w, a, b = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    ga = torch.autograd.grad(lora_linear_reference(x, w, a, b, 2.0, None, m1, 0.4).sum(), a)[0]
    gb = torch.autograd.grad(lora_linear_reference(x, w, a, b, 2.0, None, m2, 0.4).sum(), a)[0]
    assert (ga - gb).abs().max() > 1e-3  # a wrong mask is detectable by this comparison


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(backend, p):
    rows, cols = (512, 1024) if backend == "torch" else (128, 256)
    n = rows * cols
    keep = lora_dropout_mask(rows, cols, p, 99, backend=backend).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep - (1 - p)) < 6 * sigma, (keep, 1 - p, sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_output_statistics_match_nn_dropout(backend):
    """E[y] over masks equals the no-dropout output (1/(1-p) rescale), like nn.Dropout; masks vary per element."""
    x = torch.ones(64, 32)
    w = torch.zeros(8, 32)
    a = torch.ones(1, 32)
    b = torch.ones(8, 1)
    y = lora_linear(x, w, a, b, 1.0, dropout_p=0.3, seed=5, backend=backend)
    # each output = (kept count among 32) / 0.7; mean over 64 rows ~ 32 within a few sigma
    sigma = (32 * 0.3 * 0.7) ** 0.5 / 0.7 / 64**0.5
    assert abs(y[:, 0].mean().item() - 32.0) < 6 * sigma
    assert y[:, 0].std() > 0  # rows got different masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_determinism_and_fresh_seeds(backend):
    x, w, a, b = torch.randn(20, 32), torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    f = lambda **kw: lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend=backend, **kw)  # noqa: E731
    assert torch.equal(f(seed=1), f(seed=1))
    assert not torch.equal(f(seed=1), f(seed=2))
    assert not torch.equal(f(), f())  # seed=None: a fresh seed per call
    torch.manual_seed(42)
    y1 = f()
    torch.manual_seed(42)
    assert torch.equal(f(), y1)  # ... drawn from torch's default generator
    assert torch.equal(lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=torch.tensor(7), backend=backend), f(seed=7))


def test_torch_backend_leaves_no_mask_saved_for_backward():
    """Nothing of the size of x except x itself is saved: the saved tensors are x, weights, xa [N, r], seed."""
    x = torch.randn(64, 48, requires_grad=True)
    w, a, b = torch.randn(40, 48), torch.randn(4, 48, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, w, a, b, 1.0, dropout_p=0.3, backend="torch")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in big if t.shape == x.shape), [t.shape for t in big]
    assert sum(t.numel() for t in saved) <= x.numel() + w.numel() + a.numel() + b.numel() + 64 * 4 + 1


# ---------------------------------------------------------------------------------------------------------------
# bad input and dispatch


def test_bad_input_is_rejected_clearly():
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="in_features=8"):
        lora_linear(torch.randn(4, 7), w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, w, torch.randn(2, 7), b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, a, torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, a, b, 1.0, bias=torch.randn(5))
    with pytest.raises(TypeError, match="one dtype"):
        lora_linear(x, w, a.double(), b, 1.0)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        lora_linear(x.long(), w, a, b, 1.0)
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, w, a, b.to("meta"), 1.0)
    for p in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            lora_linear(x, w, a, b, 1.0, dropout_p=p)
    with pytest.raises(ValueError, match="scaling"):
        lora_linear(x, w, a, b, float("inf"))
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, w, a, b, 1.0, backend="cuda-magic")
    with pytest.raises(BackendError):
        lora_linear(x.double(), w.double(), a.double(), b.double(), 1.0, backend="triton")
    with pytest.raises(TypeError, match="seed"):
        lora_linear(x, w, a, b, 1.0, dropout_p=0.1, seed=1.5)


def test_env_backend_selection(monkeypatch):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    monkeypatch.setenv("TELLNEO_BACKEND", "triton")
    y_env = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=3)
    monkeypatch.setenv("TELLNEO_BACKEND", "torch")
    y_torch = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=3)
    torch.testing.assert_close(y_env, lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=3, backend="triton"))
    assert not torch.equal(y_env, y_torch)  # different generators: the env variable really switched backend


# ---------------------------------------------------------------------------------------------------------------
# custom op registration, torch.compile, autocast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(backend, p):
    x = torch.randn(10, 24, requires_grad=True)
    w = torch.randn(12, 24, requires_grad=True)
    a, b = torch.randn(3, 24, requires_grad=True), torch.randn(12, 3, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    seed = torch.tensor([17]) if p else None
    torch.library.opcheck(torch.ops.tellneo.lora_linear_fwd.default, (x, w, a, b, bias, 0.5, p, seed, backend))
    dy = torch.randn(10, 12)
    x, w, a, b = (t.detach() for t in (x, w, a, b))  # the backward op itself is not differentiable
    _, xa = torch.ops.tellneo.lora_linear_fwd(x, w, a, b, bias, 0.5, p, seed, backend)
    torch.library.opcheck(
        torch.ops.tellneo.lora_linear_bwd.default,
        (dy, x, w, a, b, xa, 0.5, p, seed, [True, False, True, True, True], backend),
    )


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    x = torch.randn(2, 6, 16, requires_grad=True)
    w, a, b = torch.randn(8, 16), torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)

    def f(x, a, b):
        return lora_linear(x, w, a, b, 0.5, dropout_p=p, seed=9 if p else None, backend="torch").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, a, b)
    grads = torch.autograd.grad(loss, (x, a, b))
    loss_e = f(x, a, b)
    grads_e = torch.autograd.grad(loss_e, (x, a, b))
    torch.testing.assert_close(loss, loss_e)
    for g, e in zip(grads, grads_e):
        torch.testing.assert_close(g, e)


def test_autocast_casts_like_linear():
    x, w, a, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, a, b, 0.5, backend="torch")
        y_ref = lora_linear_reference(x, w, a, b, 0.5)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.bfloat16])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed input dtypes are fine under autocast
        y_mixed = lora_linear(x, w.bfloat16(), a, b.double(), 0.5, backend="torch")
    torch.testing.assert_close(y_mixed, y_ref, **TOLERANCES[torch.bfloat16])


# ---------------------------------------------------------------------------------------------------------------
# property test over shapes (torch backend: fast enough for many examples)


def test_torch_backend_property_random_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(1, 40), d_in=st.integers(1, 48), d_out=st.integers(1, 48), r=st.integers(1, 20),
                      p=st.sampled_from([0.0, 0.05, 0.5, 0.95]), bias=st.booleans(), seed=st.integers(0, 2**40))
    def check(n, d_in, d_out, r, p, bias, seed):
        cast, dy, names = make_inputs(n, d_in, d_out, r, torch.float64, bias=bias, weight_grad=True, seed=seed % 97)
        t = cast(torch.float64)
        mask = lora_dropout_mask(n, d_in, p, seed, backend="torch") if p else None
        y, g = run(lambda *a, **k: lora_linear(*a, scaling=0.75, dropout_p=p, seed=seed, backend="torch", **k),
                   t, dy, names)
        t2 = cast(torch.float64)
        y_ref, g_ref = run(lambda x, w, a, b, bias: lora_linear_reference(x, w, a, b, 0.75, bias, mask, p),
                           t2, dy, names)
        torch.testing.assert_close(y, y_ref)
        for k in names:
            torch.testing.assert_close(g[k], g_ref[k], msg=lambda m: f"d{k}: {m}")

    check()


def test_torch_backend_float_mask_equals_bool_mask_at_the_threshold():
    """The float path that builds the 0/1 mask (int->float, subtract, clamp) decides exactly like the bool mask,
    also for bits right at and next to the threshold."""
    from tellneo.ops import _lora_torch

    for p in (1e-9, 0.1, 0.5, 0.999999):
        t = _lora_torch.keep_threshold(p)
        assert t == float(torch.tensor(t, dtype=torch.float32))  # a float32 value
        near = [min(max(int(t) + d, -(2**31)), 2**31 - 1) for d in range(-300, 301, 7)]
        v = torch.tensor(near + [-(2**31), 2**31 - 1], dtype=torch.int32)
        f = v.to(torch.float32)
        assert torch.equal(f.sub(t).clamp_(0, 1).bool(), f > t), p
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            keep = _lora_torch.keep_mask(33, 31, p, 5, torch.device("cpu"))
            keepf = _lora_torch.keep_float(33, 31, p, 5, torch.device("cpu"), dtype)
            assert keepf.dtype == dtype and torch.equal(keepf, keep.to(dtype))
