"""Helpers shared by the LoRA kernels: the dropout keep-mask, the matrix-multiply-accumulate wrapper, the
configurations for the autotuner and the launch-time flags.

Dropout: element (i, j) of ``x [M, in]`` is kept iff ``tl.rand(seed, i·in + j) >= p`` (Triton's Philox, 10
rounds, 64-bit counters). Every kernel that touches the mask derives it from the same (seed, offset), so the
forward and backward agree without storing anything.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import fp32_precision, interpreting


@triton.jit
def keep_block(seed, rows, cols, n_cols, p):
    """Bool keep-mask for the tile ``rows[:, None] x cols[None, :]`` of a matrix with ``n_cols`` columns."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. UPCAST: compute in fp32 (the Triton 3.9 interpreter's bf16
    ``tl.dot`` is wrong); IEEE: full fp32 precision for fp32 inputs (the rule of
    :func:`tellneo.kernels.common.fp32_precision`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def keep_mask_kernel(out_ptr, seed_ptr, rows, cols, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the bool keep-mask ``[rows, cols]`` (for tests and users reproducing a forward's dropout)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = keep_block(tl.load(seed_ptr), rm, rn, cols, p)
    offs = rm.to(tl.int64)[:, None] * cols + rn[None, :]
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=(rm[:, None] < rows) & (rn[None, :] < cols))


def keep_mask(rows: int, cols: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, cols]`` keep-mask the Triton LoRA kernels use for ``seed`` (int64 tensor on the device)."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=seed.device)
    if out.numel():
        with on_device(seed):
            grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))
            keep_mask_kernel[grid](out, seed, rows, cols, float(dropout_p), BLOCK_M=64, BLOCK_N=64)
    return out.bool()


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s device (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """UPCAST / IEEE constexprs for kernels computing in ``dtype``."""
    return {"UPCAST": interpreting(), "IEEE": fp32_precision(dtype) == "ieee"}


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype a kernel should write for a result wanted in ``dtype``. The Triton 3.9 interpreter converts
    fp32 -> bf16 by truncation instead of round-to-nearest-even (doubling the rounding error), so under the
    interpreter bf16 results are written in fp32 and rounded by torch; on a GPU the kernel stores bf16 itself."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def rank_block(r: int) -> int:
    """BLOCK_R: the rank padded to a power of two, at least 16 (tl.dot's minimum), at most 64 (looped above)."""
    return min(64, max(16, triton.next_power_of_2(r)))


def configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotune configurations: the H100/H200 list on a GPU, one small configuration under the interpreter."""
    if interpreting():
        kw = dict(interpreter)
        return [triton.Config(kw, num_warps=1, num_stages=1)]
    out = []
    for c in gpu:
        kw = dict(c)
        warps, stages = kw.pop("warps"), kw.pop("stages")
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


def bucket(n: int) -> int:
    """Power-of-two bucket of a size, used as an autotune key so each batch size does not retune."""
    return triton.next_power_of_2(max(1, n))
