"""Row reduction for the LoRA weight gradients: ``out [R, N] = alpha · L [M, R]ᵀ @ (keep ⊙ X [M, N])``.

``dA = gᵀ (keep ⊙ x)`` (mask regenerated per tile) and ``dBᵀ = s · xaᵀ dy``. The M dimension (tokens) is split
into SPLIT chunks so that a skinny ``[R, N]`` result still fills the GPU; each chunk writes an fp32 partial
``[SPLIT, R, N]`` that is summed afterwards (deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_common import bucket, configs, dot_flags, interpreting, keep_block, mma, rank_block

_CONFIGS = configs(
    gpu=[
        dict(BLOCK_M=64, BLOCK_N=128, warps=4, stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, warps=4, stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, warps=8, stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, warps=4, stages=4),
        dict(BLOCK_M=32, BLOCK_N=256, warps=4, stages=3),
    ],
    interpreter=dict(BLOCK_M=32, BLOCK_N=32),
)

# Rows per split chunk; a multiple of every BLOCK_M above. Small under the interpreter so tests cover SPLIT > 1.
_ROWS_PER_SPLIT_GPU = 1024
_ROWS_PER_SPLIT_INTERPRETER = 64


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "R", "HAS_DROPOUT"])
@triton.jit
def lora_reduce_kernel(
    l_ptr, x_ptr, out_ptr, seed_ptr,
    M, N, R, M_BUCKET, rows_per_split,
    stride_lm, stride_lr, stride_xm, stride_xn,
    p,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = rn < N
    r_ok = rr < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm.to(tl.int64)
        lt = tl.load(l_ptr + rows[None, :] * stride_lm + rr[:, None] * stride_lr,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_M] = Lᵀ tile
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rn[None, :] * stride_xn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_block(seed, rm, rn, N, p), x, 0.0)
        acc = mma(lt, x.to(lt.dtype), acc, UPCAST, IEEE)
    out = out_ptr + pid_s.to(tl.int64) * R * N + rr[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & n_ok[None, :])


def row_reduce(
    lo: torch.Tensor,
    x: torch.Tensor,
    *,
    alpha: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha · lo [M, R]ᵀ @ (keep ⊙ x [M, N])`` -> ``[R, N]`` (fp32 accumulation, then ``out_dtype``)."""
    M, R = lo.shape
    N = x.shape[1]
    rows_per_split = _ROWS_PER_SPLIT_INTERPRETER if interpreting() else _ROWS_PER_SPLIT_GPU
    split = max(1, triton.cdiv(M, rows_per_split))
    partial = torch.empty(split, R, N, dtype=torch.float32, device=x.device)
    block_r = rank_block(R)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(R, block_r), split)

    lora_reduce_kernel[grid](
        lo, x, partial, seed if seed is not None else x,
        M, N, R, bucket(M), rows_per_split,
        lo.stride(0), lo.stride(1), x.stride(0), x.stride(1),
        float(dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r, **dot_flags(x.dtype),
    )  # fmt: skip
    out = partial.sum(0) if split > 1 else partial[0]
    return out.mul_(alpha).to(out_dtype or x.dtype)
