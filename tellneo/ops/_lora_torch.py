"""The ``torch`` backend of :func:`tellneo.ops.lora_linear`: a memory-lean plain-PyTorch forward and backward.

Compared with PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * s`` this path

* stores only ``x``, the weights and the rank-r intermediate ``xa = drop(x) Aᵀ`` for the backward — no dropout
  mask and no dropped copy of ``x`` (the mask is regenerated from the seed in the backward);
* adds the LoRA expansion into the base GEMM's output in place (``addmm_``), so no ``[N, out]`` temporaries;
* folds the LoRA scaling and the dropout rescale ``1/(1-p)`` into the rank-r tensors, never into ``[N, in]``.

The dropout keep-mask is drawn from a ``torch.Generator`` seeded with ``seed`` (Mersenne Twister on CPU, Philox
on CUDA): 32 random bits per element (stream position ``i·cols + j``), read as a signed int32 ``v`` and converted
to float32; the element is kept iff ``float(v) > float(t)`` with ``t = round(p·2³²) - 2³¹``. Float rounding is
monotonic, so this is an integer threshold within 2⁷ of ``t``: the keep probability is within 2⁻²⁵ of ``1 - p``
(``nn.Dropout``'s own float comparison is no finer). Drawing 32-bit integers is about 3× cheaper on CPU than
``bernoulli_``, which is what makes regenerating the mask in the backward affordable. The 0/1 mask is then made
in the bits' own buffer with three elementwise ops (int→float, subtract, clamp to [0, 1]: a positive difference
of two integer-valued floats is ≥ 1) — no bool tensors, which make ``where`` / ``masked_fill`` several times
slower than float multiplies on CPU, and few ops, because on a loaded machine every parallel op waits for its
slowest thread.
"""

from __future__ import annotations

import torch

from tellneo.kernels.common import dropout_keep_scale

_TWO31 = 1 << 31


def keep_threshold(dropout_p: float) -> float:
    """Float32 threshold ``float(round(p·2³²) - 2³¹)``: an element with int32 bits ``v`` is kept iff ``float(v)`` is
    greater."""
    return torch.tensor(round(dropout_p * (1 << 32)) - _TWO31, dtype=torch.float32).item()


def _random_bits_as_float(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` uniform int32 values for ``seed`` (flat, stream order), converted in place to float32."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    buf = torch.empty(n + (n & 1), dtype=torch.float32, device=device)
    buf.view(torch.int64).random_(-(1 << 63), None, generator=gen)
    buf.copy_(buf.view(torch.int32))  # int32 -> float32 element by element over the same memory (full overlap)
    return buf[:n]


def keep_mask(rows: int, cols: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask ``[rows, cols]`` for ``(seed, dropout_p)``."""
    return _random_bits_as_float(rows * cols, seed, device).view(rows, cols) > keep_threshold(dropout_p)


def keep_float(
    rows: int, cols: int, dropout_p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`keep_mask` as 0/1 values of ``dtype`` (one ``[rows, cols]`` float32 buffer, three ops)."""
    keep = _random_bits_as_float(rows * cols, seed, device).sub_(keep_threshold(dropout_p)).clamp_(0.0, 1.0)
    return keep.view(rows, cols).to(dtype)


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
        xa.mul_(dropout_keep_scale(dropout_p))
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
    keep_scale = dropout_keep_scale(dropout_p)
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
