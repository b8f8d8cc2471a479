"""LoRA shrink: ``out [M, R] = alpha · (keep ⊙ X) [M, K] @ Wᵀ`` with ``W [R, K]`` — the rank-r projection.

Forward: ``xa = 1/(1-p) · drop(x) Aᵀ`` (dropout fused: the mask is generated per tile, never stored).
Backward: ``g = s/(1-p) · dy B`` (``W = Bᵀ``, no dropout). One program per (BLOCK_M rows, BLOCK_R ranks) reads
its rows of X once; fp32 accumulation, output in ``out``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import bucket, configs, dot_flags, keep_block, mma, rank_block, store_dtype

_CONFIGS = configs(
    gpu=[
        dict(BLOCK_M=64, BLOCK_K=128, warps=4, stages=3),
        dict(BLOCK_M=128, BLOCK_K=64, warps=4, stages=4),
        dict(BLOCK_M=128, BLOCK_K=128, warps=8, stages=3),
        dict(BLOCK_M=32, BLOCK_K=256, warps=4, stages=3),
        dict(BLOCK_M=64, BLOCK_K=64, warps=4, stages=4),
    ],
    interpreter=dict(BLOCK_M=32, BLOCK_K=32),
)


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "K", "R", "HAS_DROPOUT"])
@triton.jit
def lora_shrink_kernel(
    x_ptr, w_ptr, out_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om, stride_or,
    p, alpha,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rr[None, :] * stride_wr
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_block(seed, rm, kk, K, p), x, 0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = mma(x, w, acc, UPCAST, IEEE)
    acc = acc * alpha
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


def shrink(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    alpha: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha · (keep ⊙ x) @ wᵀ`` for ``x [M, K]``, ``w [R, K]`` (any strides) -> ``[M, R]``."""
    M, K = x.shape
    R = w.shape[0]
    want = out_dtype or x.dtype
    out = torch.empty(M, R, dtype=store_dtype(want), device=x.device)
    block_r = rank_block(R)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))

    lora_shrink_kernel[grid](
        x, w, out, seed if seed is not None else x,
        M, K, R, bucket(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        float(dropout_p), float(alpha),
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r, **dot_flags(x.dtype),
    )  # fmt: skip
    return out.to(want)
