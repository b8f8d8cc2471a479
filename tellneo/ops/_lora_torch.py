"""The ``torch`` backend of :func:`tellneo.ops.lora_linear`: a memory-lean plain-PyTorch forward and backward.

Compared with PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * s`` this path

* stores only ``x``, the weights and the rank-r intermediate ``xa = drop(x) Aᵀ`` for the backward — no dropout
  mask and no dropped copy of ``x`` (the mask is regenerated from the seed in the backward);
* adds the LoRA expansion into the base GEMM's output in place (``addmm_``), so no ``[N, out]`` temporaries;
* folds the LoRA scaling and the dropout rescale ``1/(1-p)`` into the rank-r tensors, never into ``[N, in]``.

The dropout keep-mask is drawn from a ``torch.Generator`` seeded with ``seed`` (Mersenne Twister on CPU, Philox
on CUDA): 32 random bits per element (stream position ``i·cols + j``), read as a signed int32 ``v``; the element
is kept iff ``v >= t`` with the even threshold ``t = 2·round(p·2³¹) - 2³¹``. The keep probability is
``1 - round(p·2³¹)/2³¹``, within 2⁻³² of ``1 - p`` — finer than ``nn.Dropout``'s own float comparison. Drawing
32-bit integers is about 3× cheaper on CPU than ``bernoulli_``, which is what makes regenerating the mask in the
backward affordable; the 0/1 float mask is then made in place with integer shifts (no bool tensor: ``where`` /
``masked_fill`` with bool masks cost several float multiplies on CPU).
"""

from __future__ import annotations

import torch

_TWO31 = 1 << 31


def keep_threshold(dropout_p: float) -> int:
    """Even signed int32 threshold ``t``: an element with uniform int32 bits ``v`` is kept iff ``v >= t``."""
    return 2 * round(dropout_p * _TWO31) - _TWO31


def _random_int32(n: int, seed: int, device: torch.device, like: torch.dtype = torch.int32) -> torch.Tensor:
    """``n`` uniform int32 values (flat) for ``seed``, in a fresh buffer of ``n`` 4-byte elements of dtype ``like``
    (viewed as int32), so a float32 mask can be produced in the same memory."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    buf = torch.empty(n + (n & 1), dtype=like, device=device)
    buf.view(torch.int64).random_(-(1 << 63), None, generator=gen)
    return buf.view(torch.int32)[:n]


def keep_mask(rows: int, cols: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask ``[rows, cols]`` for ``(seed, dropout_p)``."""
    return _random_int32(rows * cols, seed, device).view(rows, cols) >= keep_threshold(dropout_p)


def keep_float(
    rows: int, cols: int, dropout_p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`keep_mask` as 0/1 values of ``dtype``, computed in place: ``((v >> 1) - t/2) >> 31`` is -1 exactly
    when ``v < t`` (t even; no int32 overflow after the first shift), so adding 1 gives keep = 1, drop = 0."""
    like = torch.float32 if dtype == torch.float32 else torch.int32
    v = _random_int32(rows * cols, seed, device, like)
    v.bitwise_right_shift_(1).sub_(keep_threshold(dropout_p) >> 1).bitwise_right_shift_(31).add_(1)
    if like == torch.float32:
        out = v.view(torch.float32)
        out.copy_(v)  # int32 -> float32 element by element over the same memory (full overlap is allowed)
    else:
        out = v.to(dtype)
    return out.view(rows, cols)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for 2-D ``x [N, in]``: ``xa = drop(x) Aᵀ`` (dropout rescale included) and
    ``y = x Wᵀ + b + s·xa Bᵀ``."""
    if dropout_p > 0.0:
        kept_x = keep_float(x.shape[0], x.shape[1], dropout_p, seed, x.device, x.dtype).mul_(x)
        xa = kept_x.matmul(lora_A.t())
        del kept_x
        xa.mul_(1.0 / (1.0 - dropout_p))
    else:
        xa = x.matmul(lora_A.t())
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x.matmul(weight.t())
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_da: bool,
    need_db_lora: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dW, db, dA, dB)`` (``None`` where not needed) for ``dy [N, out]``.

    With ``g = s/(1-p) · dy B`` (rank r, computed once and reused) and ``m`` the regenerated keep-mask:
    ``dB = s · dyᵀ xa``, ``dA = gᵀ (m⊙x)``, ``dx = dy W + m ⊙ (g A)``, ``dW = dyᵀ x``, ``db = Σ dy``.
    """
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    dx = dw = db = da = db_lora = None
    if need_db_lora:
        db_lora = dy.t().matmul(xa).mul_(scaling)
    if need_dx or need_da:
        g = dy.matmul(lora_B).mul_(scaling * keep_scale)  # [N, r]
        keep = None
        if dropout_p > 0.0:
            keep = keep_float(x.shape[0], x.shape[1], dropout_p, seed, x.device, x.dtype)
        if need_dx:
            dx = dy.matmul(weight)
            if keep is None:
                dx.addmm_(g, lora_A)
            else:
                dx.addcmul_(g.matmul(lora_A), keep)
        if need_da:
            da = g.t().matmul(x if keep is None else keep.mul_(x))  # last use of keep: overwrite in place
    if need_dw:
        dw = dy.t().matmul(x)
    if need_db:
        db = dy.sum(0)
    return dx, dw, db, da, db_lora
