"""Launch sequence of the Triton LoRA linear (no autograd here; see ``tellneo.ops.lora_linear``).

Forward (2 kernels):   xa = 1/(1-p) · drop(x) Aᵀ                      [shrink, dropout fused]
                       y  = x Wᵀ + b + s · xa Bᵀ                        [expand: base GEMM + rank-r epilogue]
Backward (4 kernels):  g  = s/(1-p) · dy B                            [shrink over dy, rank r, reused twice]
                       dx = dy W + keep ⊙ (g A)                        [expand, mask regenerated in epilogue]
                       dA = gᵀ (keep ⊙ x)                              [row reduce, mask regenerated]
                       dB = s · dyᵀ xa                                 [row reduce over dy]
                       dW = dyᵀ x, db = Σ dy                           [torch, only when they require grad]
"""

from __future__ import annotations

import torch

from .common import dropout_keep_scale
from .lora_common import keep_mask, on_device
from .lora_expand import expand_matmul
from .lora_reduce import row_reduce
from .lora_shrink import shrink

__all__ = ["forward", "backward", "keep_mask"]


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, out], xa [M, r])`` for 2-D ``x [M, in]``; ``seed``: int64 device tensor when ``dropout_p > 0``."""
    with on_device(x):
        return _forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)


def _forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    keep_scale = dropout_keep_scale(dropout_p)
    xa = shrink(x, lora_A, alpha=keep_scale, dropout_p=dropout_p, seed=seed)
    if weight.shape[0] == 0:
        return x.new_empty(x.shape[0], 0), xa
    y = expand_matmul(x, weight.t(), xa, lora_B.t(), alpha=scaling, bias=None if bias is None else bias.contiguous())
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
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_da: bool,
    need_db_lora: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dW, db, dA, dB)``, ``None`` where not needed."""
    with on_device(x):
        return _backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed,
                         need_dx, need_dw, need_db, need_da, need_db_lora)


def _backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_dw, need_db, need_da,
              need_db_lora):
    dx = dw = db = da = db_lora = None
    if need_dx or need_da:
        keep_scale = dropout_keep_scale(dropout_p)
        g = shrink(dy, lora_B.t(), alpha=scaling * keep_scale)
        if need_dx:
            dx = expand_matmul(dy, weight, g, lora_A, alpha=1.0, dropout_p=dropout_p, seed=seed)
        if need_da:
            da = row_reduce(g, x, alpha=1.0, dropout_p=dropout_p, seed=seed, out_dtype=lora_A.dtype)
    if need_db_lora:
        db_lora = row_reduce(xa, dy, alpha=scaling, out_dtype=lora_B.dtype).t().contiguous()
    if need_dw:
        dw = dy.t().matmul(x)
    if need_db:
        db = dy.sum(0)
    return dx, dw, db, da, db_lora
