"""The ``torch`` backend of :func:`tellneo.ops.lora_linear`: a memory-lean plain-PyTorch forward and backward.

Compared with PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * s`` this path

* stores only ``x``, the weights and the rank-r intermediate ``xa = drop(x) Aᵀ`` for the backward — no dropout
  mask and no dropped copy of ``x`` (the mask is regenerated from the seed in the backward);
* adds the LoRA expansion into the base GEMM's output in place (``addmm_``), so no ``[N, out]`` temporaries;
* folds the LoRA scaling and the dropout rescale ``1/(1-p)`` into the rank-r tensors, never into ``[N, in]``.

The dropout keep-mask is drawn from a ``torch.Generator`` seeded with ``seed`` (Mersenne Twister on CPU, Philox
on CUDA): 32 random bits per element, element kept when its bits (as a signed int32) are ``>= round(p·2³²) - 2³¹``.
The keep probability is ``1 - round(p·2³²)/2³²`` — within 2⁻³³ of ``1 - p``, finer than ``nn.Dropout``'s own
float comparison. Drawing 32-bit integers is about 3× cheaper on CPU than ``bernoulli_``, which is what makes
regenerating the mask in the backward affordable.
"""

from __future__ import annotations

import torch

_TWO32 = 1 << 32
_TWO31 = 1 << 31


def keep_threshold(dropout_p: float) -> int:
    """Signed int32 threshold t: an element with uniform int32 bits ``v`` is kept iff ``v >= t``."""
    return round(dropout_p * _TWO32) - _TWO31


def keep_mask(rows: int, cols: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask ``[rows, cols]`` for ``(seed, dropout_p)``; element (i, j) uses stream position i·cols + j."""
    n = rows * cols
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    bits.random_(-(1 << 63), None, generator=gen)
    return bits.view(torch.int32)[:n].view(rows, cols) >= keep_threshold(dropout_p)


def keep_float(
    rows: int, cols: int, dropout_p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`keep_mask` as 0/1 in ``dtype``: float multiplies are several times faster on CPU than ``where`` /
    ``masked_fill`` with a bool mask, and the converted mask serves both backward uses."""
    return keep_mask(rows, cols, dropout_p, seed, device).to(dtype)


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
