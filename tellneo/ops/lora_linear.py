"""Fused LoRA linear: ``y = x Wᵀ (+ b) + s · dropout_p(x) Aᵀ Bᵀ``, the dropout mask regenerated in the backward.

Public functions:

* :func:`lora_linear` — the op (autograd-aware ``torch.library`` custom op, ``torch.compile``-friendly).
* :func:`lora_linear_reference` — the same math in plain PyTorch, optionally fed an explicit dropout mask.
* :func:`lora_dropout_mask` — the keep-mask that :func:`lora_linear` uses for a given seed and backend.

Backends (``backend=`` or ``TELLNEO_BACKEND``):

* ``"triton"`` — fused Triton kernels (default for CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
  Dropout uses Triton's Philox keyed by ``(seed, row·in + col)``.
* ``"torch"`` — memory-lean plain PyTorch (default on CPU): no stored mask, in-place epilogues, rank-r scaling.
  Dropout draws 32-bit integers from a ``torch.Generator`` seeded with ``seed``.

The two backends produce different masks for the same seed (different generators); each is deterministic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tellneo._backend import choose_backend, triton_interpreter_enabled
from tellneo.ops import _lora_torch

__all__ = ["lora_linear", "lora_linear_reference", "lora_dropout_mask"]

_OP = "lora_linear"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# reference


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Readable PyTorch reference of :func:`lora_linear`.

    Shapes: ``x [..., in]``, ``weight [out, in]``, ``lora_A [r, in]``, ``lora_B [out, r]``, ``bias [out]``,
    ``dropout_mask`` broadcastable to ``x`` (1 = keep, 0 = drop); returns ``[..., out]`` in ``x.dtype``.

    ``y = x Wᵀ + b + scaling · ((x ⊙ mask) / (1 - dropout_p)) Aᵀ Bᵀ``; without a mask no dropout is applied
    (``dropout_p`` is then ignored). Differentiable by autograd in every argument.

    >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
    >>> a, b = torch.ones(1, 3), torch.ones(4, 1)
    >>> lora_linear_reference(x, w, a, b, scaling=0.5)[0]
    tensor([4.5000, 4.5000, 4.5000, 4.5000])
    """
    y = F.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return y + scaling * F.linear(F.linear(xd, lora_A), lora_B)


# ----------------------------------------------------------------------------------------------------------------
# argument checks and dispatch


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> None:
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"lora_linear: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            "lora_linear: weight [out, in], lora_A [r, in] and lora_B [out, r] must be 2-D, got "
            f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"lora_linear: x {tuple(x.shape)} must end in in_features={in_f} (weight {tuple(weight.shape)})"
        )
    if lora_A.shape[1] != in_f or r < 1:
        raise ValueError(f"lora_linear: lora_A must be [r >= 1, in={in_f}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_linear: lora_B must be [out={out_f}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"lora_linear: bias must be [out={out_f}], got {tuple(bias.shape)}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"lora_linear: all tensors must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {devices}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"lora_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling)):
        raise ValueError(f"lora_linear: scaling must be a finite float, got {scaling!r}")


def _triton_unavailable_reason(x: torch.Tensor) -> str | None:
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernels (float16/bfloat16/float32)"
    if x.device.type == "cpu" and not triton_interpreter_enabled():
        return "CPU tensors need TRITON_INTERPRET=1 for the Triton backend"
    if x.device.type not in ("cpu", "cuda"):
        return f"device type {x.device.type!r} is not supported"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install tellneo[triton])"
    return None


def _resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    return choose_backend(
        _OP,
        backend,
        is_cuda=x.device.type == "cuda",
        available={"triton": lambda: _triton_unavailable_reason(x), "torch": lambda: None},
        auto_cuda=("triton", "torch"),
        auto_cpu=("torch",),
    )


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.reshape(-1)[0].item())


# ----------------------------------------------------------------------------------------------------------------
# custom ops: forward returns (y, xa); backward returns (dx, dW, db, dA, dB), zero-size where not needed


@torch.library.custom_op("tellneo::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from tellneo.kernels import lora_linear as kernels

        return kernels.forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
    y, xa = _lora_torch.forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, _seed_int(seed))
    return y, xa


@_lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("tellneo::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    needs: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()
    if backend == "triton":
        from tellneo.kernels import lora_linear as kernels

        grads = kernels.backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, *needs)
    else:
        grads = _lora_torch.backward(
            dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, _seed_int(seed), *needs
        )
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)  # type: ignore[return-value]


@_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, needs, backend):
    shapes = (x.shape, weight.shape, (weight.shape[0],), lora_A.shape, lora_B.shape)
    return tuple(dy.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.has_bias = bias is not None


def _backward(ctx: Any, dy: torch.Tensor, _dxa: torch.Tensor | None) -> tuple:
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [bool(n[0]), bool(n[1]), bool(n[4] and ctx.has_bias), bool(n[2]), bool(n[3])]
    dx, dw, db, da, dbl = torch.ops.tellneo.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, needs, ctx.backend
    )
    pick = [g if need else None for g, need in zip((dx, dw, db, da, dbl), needs)]
    return pick[0], pick[1], pick[3], pick[4], pick[2], None, None, None, None


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public API


def _seed_tensor(seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if seed is None:
        # Drawn from torch's default generator of x's device, so torch.manual_seed governs it; stays on the
        # device (no host sync), and checkpoint's RNG-state replay gives the recomputed forward the same seed.
        return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"lora_linear: a tensor seed must hold one int64/int32 value, got {seed.dtype} {tuple(seed.shape)}"
            )
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"lora_linear: seed must be None, an int or an int64 tensor, got {type(seed).__name__}")
    return torch.tensor([seed & 0x7FFF_FFFF_FFFF_FFFF], dtype=torch.int64, device=device)


def _autocast(tensors: list[Any], device_type: str) -> list[Any]:
    """Under ``torch.autocast`` cast floating tensors to the autocast dtype, as ``F.linear`` would."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer ``y = x Wᵀ (+ b) + scaling · dropout_p(x) Aᵀ Bᵀ`` in one op.

    Args:
        x: ``[..., in]`` input, any leading shape (non-contiguous input is copied once).
        weight: ``[out, in]`` base weight (frozen unless it requires grad; dW is computed only then).
        lora_A: ``[r, in]``; lora_B: ``[out, r]``; ``r >= 1``.
        scaling: LoRA scale ``s`` (PEFT: ``lora_alpha / r``).
        bias: optional ``[out]`` base bias.
        dropout_p: dropout probability on the LoRA branch's input, in ``[0, 1)``. Elements are kept with
            probability ``1 - p`` and scaled by ``1 / (1 - p)`` (the distribution of ``nn.Dropout``). Pass 0 in
            eval mode. The mask is never stored: the backward regenerates it from ``seed``.
        seed: ``None`` (draw a fresh seed from torch's default generator of ``x.device``, so
            ``torch.manual_seed`` governs it), an ``int``, or a one-element int64 tensor. A fixed seed gives
            the same mask on every call.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    All tensors share one dtype (float16/bfloat16/float32; float64 on the torch backend) and device; under
    ``torch.autocast`` they are first cast to the autocast dtype (so they may differ). Returns ``[..., out]`` in
    that dtype. An empty batch (``x [0, in]``, ``[B, 0, in]``, ...) gives the empty ``[..., out]`` output, still
    connected to every argument, so its backward yields zero gradients for lora_A / lora_B / bias, as PEFT's does.
    Gradients: dx, dA, dB (and dW / db when those require grad), with ``s · dy B`` computed once and reused.

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, w = torch.randn(4, 8), torch.randn(6, 8)
    >>> a, b = torch.randn(2, 8), torch.randn(6, 2)
    >>> y = lora_linear(x, w, a, b, scaling=2.0, backend="torch")
    >>> torch.allclose(y, lora_linear_reference(x, w, a, b, scaling=2.0), atol=1e-5)
    True
    """
    if isinstance(x, torch.Tensor):
        x, weight, lora_A, lora_B, bias = _autocast([x, weight, lora_A, lora_B, bias], x.device.type)
    _check_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
    chosen = _resolve_backend(x, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    seed_t = _seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    if x2.shape[0] == 0:
        # An empty batch: the reference formula on zero rows costs nothing and, like PEFT, keeps the output in
        # the graph of every argument, so backward gives zero (not missing) gradients for lora_A / lora_B / bias.
        # Dropout is irrelevant on zero elements.
        y0 = lora_linear_reference(x2, weight, lora_A, lora_B, float(scaling), bias)
        return y0.reshape(*lead, weight.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        y, _ = torch.ops.tellneo.lora_linear_fwd(
            x2, weight, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed_t, chosen
        )
    return y.reshape(*lead, weight.shape[0])


def lora_dropout_mask(
    rows: int,
    cols: int,
    dropout_p: float,
    seed: int | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The bool keep-mask ``[rows, cols]`` that :func:`lora_linear` applies to ``x`` reshaped to ``[rows, cols]``
    (``rows`` = number of tokens, ``cols`` = in_features) for this ``seed`` and backend.

    ``dtype`` only selects the backend ``"auto"`` would pick for inputs of that dtype.
    """
    device = torch.device(device)
    probe = torch.empty(0, dtype=dtype, device=device)
    chosen = _resolve_backend(probe, backend)
    seed_t = _seed_tensor(seed, device)
    if dropout_p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    if chosen == "triton":
        from tellneo.kernels import lora_linear as kernels

        return kernels.keep_mask(rows, cols, dropout_p, seed_t)
    return _lora_torch.keep_mask(rows, cols, dropout_p, _seed_int(seed_t), device)
