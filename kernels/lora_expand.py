"""Base GEMM with the LoRA expansion in its epilogue:
``out [M, N] = X [M, K] @ W [K, N] (+ bias) + alpha · keep ⊙ (L [M, R] @ U [R, N])``.

Forward: ``y = x Wᵀ + b + s · xa Bᵀ`` (W passed transposed by strides, U = Bᵀ, no mask).
Backward: ``dx = dy W + keep ⊙ (g A)`` (the dropout mask regenerated in the epilogue for the tile).
Tiles are visited in GROUP_M-grouped order for L2 reuse; fp32 accumulation; the rank-r product is accumulated
separately and added once, so the base GEMM's accumulation order is that of a plain matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import bucket, configs, dot_flags, keep_block, mma, rank_block, store_dtype

_CONFIGS = configs(
    gpu=[
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=4, stages=4),
        dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, warps=4, stages=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, warps=4, stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=4, stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, warps=4, stages=5),
    ],
    interpreter=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
)


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "HAS_BIAS"])
@triton.jit
def lora_expand_kernel(
    x_ptr, w_ptr, l_ptr, u_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr, stride_ur, stride_un,
    stride_om, stride_on,
    p, alpha,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = tl.minimum(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Clamped row/column indices: out-of-range rows/cols read valid memory and are masked at the store.
    rm_c = (rm % M).to(tl.int64)
    rn_c = (rn % N).to(tl.int64)
    x_rows = x_ptr + rm_c[:, None] * stride_xm
    w_cols = w_ptr + rn_c[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
        acc = mma(x, w, acc, UPCAST, IEEE)

    rr = tl.arange(0, BLOCK_R)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        lt = tl.load(l_ptr + rm_c[:, None] * stride_lm + (r0 + rr)[None, :] * stride_lr, mask=r_ok[None, :], other=0.0)
        u = tl.load(u_ptr + (r0 + rr)[:, None] * stride_ur + rn_c[None, :] * stride_un, mask=r_ok[:, None], other=0.0)
        lora = mma(lt, u.to(lt.dtype), lora, UPCAST, IEEE)
    if HAS_DROPOUT:
        lora = tl.where(keep_block(tl.load(seed_ptr), rm, rn, N, p), lora, 0.0)
    acc += lora * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]

    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def expand_matmul(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    lo: torch.Tensor,
    up: torch.Tensor,
    *,
    alpha: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ w_kn [K, N] + bias + alpha · keep ⊙ (lo [M, R] @ up [R, N])`` -> ``[M, N]`` in x's dtype.

    ``w_kn`` / ``up`` may be transposed views (e.g. ``weight.t()``); only strides are used.
    """
    M, K = x.shape
    N = w_kn.shape[1]
    R = lo.shape[1]
    out = torch.empty(M, N, dtype=store_dtype(x.dtype), device=x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    lora_expand_kernel[grid](
        x, w_kn, lo, up, bias if bias is not None else x, out, seed if seed is not None else x,
        M, N, K, R, bucket(M),
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), lo.stride(0), lo.stride(1),
        up.stride(0), up.stride(1), out.stride(0), out.stride(1),
        float(dropout_p), float(alpha),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=rank_block(R), **dot_flags(x.dtype),
    )  # fmt: skip
    return out.to(x.dtype)
