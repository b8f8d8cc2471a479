"""Triton kernels of :func:`tellneo.ops.fused_linear_kd`: vocab-tiled lm_head + CE + KD, nothing ``[N, V]``.

Three kernels, all walking ``BLOCK_N`` tokens x ``BLOCK_V`` vocab tiles whose logits are computed on chip
(``tl.dot`` over ``BLOCK_K`` slices of the hidden size, fp32 accumulation):

``_kd_stats_kernel``   grid (token blocks, vocab splits). Online max / sum-exp in fp32 for the student's CE logits
                       ``z``, its tempered logits ``s = z / T`` and the teacher's ``t``, the label logit, and the
                       running forward / reverse KL sums, kept *centred* on the running maxima (``sum e^(t-m_t)
                       ((t-m_t) - (s-m_s))``) so that ``KL = A / S_t - log S_t + log S_s`` has no cancellation of
                       large logsumexps (logits of +-1e4 stay exact). Each vocab split writes partial statistics;
                       :func:`_combine` merges them in O(N * splits).
``_kd_jsd_kernel``     (JSD only) a second pass over the tiles with the final row statistics, summing
                       ``beta p log(p/m) + (1-beta) q log(q/m)`` and ``sum q log(q/m)`` per row.
``_kd_bwd_kernel``     grid (token blocks, vocab tiles). Recomputes the logit tiles, forms ``d loss / d z`` from the
                       O(N) per-row statistics (formulas of :mod:`tellneo.ops.divergences`), and accumulates
                       ``dh += dz @ W_tile`` and ``dW_tile += dz^T @ h`` (and ``db``) with fp32 atomics.

Row statistics (:data:`NUM_ROW_STATS` per row, the ``stats`` the forward hands to the backward) keep each
logsumexp as its two parts, the row maximum ``m`` and ``log S = log sum exp(x - m)``, never their fp32 sum: the
second pass and the backward form ``log q = (s - m_s) - log S_s`` from recomputed logits, centred exactly as in
the forward, so at logits of +-1e4 (fp32 spacing ~1e-3) ``log q - log p`` and ``exp(log q)`` keep full relative
precision (a saturated row's reverse-KL gradient is ~1e-100, not the ~5e-4 that ``z - lse`` would give).

A sparse (top-k) teacher uses the student-only statistics of :func:`kd_forward`; its ``k`` gathered logits and
the ``k + 1``-bucket math run in PyTorch on the ops side (``tellneo.ops._kd_triton``), which hands
:func:`kd_backward` the per-row weight ``g_lse`` of the dense part of that gradient.

Only kernels and launchers live here: no autograd, no argument checks, nothing imported from ``tellneo``. The
launchers take plain tensors and Python scalars (already validated by ``tellneo.ops``) and return per-row fp32
tensors; masking ignored rows, the ``T^2`` factor and the top-k teacher are the caller's. Divergences are passed
as integer codes (:data:`FORWARD_KL`, :data:`REVERSE_KL`, :data:`JSD`: the positions of the names in
``tellneo.ops.DIVERGENCES``).

fp32 matmul precision (the rule shared with the LoRA kernels, :func:`tellneo.kernels.common.fp32_precision`):
fp32 operands use ``input_precision="ieee"`` unless ``torch.backends.cuda.matmul.allow_tf32`` is set, in which
case they use TF32 like torch's own fp32 matmuls; bf16/fp16 operands use the tensor cores with fp32
accumulation. Block sizes for CUDA are reasonable defaults, not tuned on hardware; fp32 atomics make the
gradients' last bits depend on scheduling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import fp32_precision

NUM_PARTS = 9  # partial statistics per split: m_z S_z m_s S_s m_t S_t A B z_label
# per-row statistics the forward returns for the backward: (max, log sum exp(x - max)) of the CE logits z, the
# tempered student s and the tempered teacher t, then aux (reverse KL: D; JSD: KL(q || m); forward KL: 0)
ROW_STATS = ("m_z", "logS_z", "m_s", "logS_s", "m_t", "logS_t", "aux")
NUM_ROW_STATS = len(ROW_STATS)
# Globals read inside @triton.jit must be constexpr (the interpreter does not enforce it, the compiler does).
_NEG_INIT = tl.constexpr(-1.0e30)  # running-max start: finite, so exp(m_old - m_new) is 0, never nan
_NUM_PARTS = tl.constexpr(NUM_PARTS)
_NUM_ROW_STATS = tl.constexpr(NUM_ROW_STATS)
#: Divergence codes of the ``DIV`` constexpr / the launchers' ``divergence`` argument (the order of
#: ``tellneo.ops.DIVERGENCES``).
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


@triton.jit
def _tanh(x):
    # overflow-safe: exp(2x) -> inf gives 1, -> 0 gives -1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (interpreter only): Triton 3.9's interpreter multiplies bfloat16 operands as raw 16-bit integers;
    # bf16 -> fp32 is exact, so upcasting reproduces what the tensor cores compute (fp32 accumulation).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_x, stride_w, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """transform(x[rows] @ w[cols]^T + b[cols]) as a [BLOCK_N, BLOCK_V] fp32 tile (masked entries finite)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # int64: V * H can exceed 2**31
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _kd_stats_kernel(
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, part_ptr,
    N, V, HS, HT, stride_sh, stride_sw, stride_th, stride_tw, v_per_split,
    inv_temp, logit_scale, softcap, t_logit_scale, t_softcap,
    HAS_LABELS: tl.constexpr, HAS_KD: tl.constexpr, HAS_TEACHER: tl.constexpr, SAME_T: tl.constexpr,
    HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TSOFTCAP: tl.constexpr,
    DIV: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m_z = tl.full((BLOCK_N,), _NEG_INIT, tl.float32)
    s_z = tl.zeros((BLOCK_N,), tl.float32)
    z_lab = tl.zeros((BLOCK_N,), tl.float32)
    m_s = tl.full((BLOCK_N,), _NEG_INIT, tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), _NEG_INIT, tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    acc_a = tl.zeros((BLOCK_N,), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(sh_ptr, sw_ptr, sb_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw,
                         logit_scale, softcap, HAS_SB, HAS_SOFTCAP, PRECISION_S, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        z_fin = z  # finite everywhere (masked columns are 0): used in differences, never -inf - -inf
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if HAS_LABELS:
            m_new = tl.maximum(m_z, tl.max(z, 1))
            s_z = s_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m_z = m_new
            z_lab += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), 1)
        if HAS_KD:
            if SAME_T:
                s = z
            else:
                s = z * inv_temp
            ms_new = tl.maximum(m_s, tl.max(s, 1))
            alpha_s = tl.exp(m_s - ms_new)
            e_s = tl.exp(s - ms_new[:, None])
            if HAS_TEACHER:
                t = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, row_mask, col_mask, HT, stride_th, stride_tw,
                                 t_logit_scale, t_softcap, HAS_TB, HAS_TSOFTCAP, PRECISION_T, UPCAST,
                                 BLOCK_N, BLOCK_V, BLOCK_K)
                t_fin = t * inv_temp
                t = tl.where(col_mask[None, :], t_fin, float("-inf"))
                mt_new = tl.maximum(m_t, tl.max(t, 1))
                alpha_t = tl.exp(m_t - mt_new)
                e_t = tl.exp(t - mt_new[:, None])
                # centred difference (t - m_t) - (s - m_s); re-centring old terms shifts them by -(dm_t - dm_s)
                shift = (mt_new - m_t) - (ms_new - m_s)
                if SAME_T:
                    s_fin = z_fin
                else:
                    s_fin = z_fin * inv_temp
                d = tl.where(col_mask[None, :], (t_fin - mt_new[:, None]) - (s_fin - ms_new[:, None]), 0.0)
                if DIV == 0:
                    acc_a = alpha_t * (acc_a - shift * s_t) + tl.sum(e_t * d, 1)
                if DIV == 1:
                    acc_b = alpha_s * (acc_b + shift * s_s) - tl.sum(e_s * d, 1)
                s_t = s_t * alpha_t + tl.sum(e_t, 1)
                m_t = mt_new
            s_s = s_s * alpha_s + tl.sum(e_s, 1)
            m_s = ms_new
    base = part_ptr + pid_s * _NUM_PARTS * N + rows
    tl.store(base + 0 * N, m_z, mask=row_mask)
    tl.store(base + 1 * N, s_z, mask=row_mask)
    tl.store(base + 2 * N, m_s, mask=row_mask)
    tl.store(base + 3 * N, s_s, mask=row_mask)
    tl.store(base + 4 * N, m_t, mask=row_mask)
    tl.store(base + 5 * N, s_t, mask=row_mask)
    tl.store(base + 6 * N, acc_a, mask=row_mask)
    tl.store(base + 7 * N, acc_b, mask=row_mask)
    tl.store(base + 8 * N, z_lab, mask=row_mask)


@triton.jit
def _load_stat(stats_ptr, rows, row_mask, col: tl.constexpr):
    """Column ``col`` of the ``[N, NUM_ROW_STATS]`` row statistics for ``rows``."""
    return tl.load(stats_ptr + rows * _NUM_ROW_STATS + col, mask=row_mask, other=0.0)


@triton.jit
def _centred_log_softmax(x, m, log_s):
    """``log softmax(x) = (x - m) - log S`` from the row's max ``m`` and ``log S = log sum exp(x - m)``: the
    difference ``x - m`` of two large logits is exact, the sum ``m + log S`` is never rounded."""
    return (x - m[:, None]) - log_s[:, None]


@triton.jit
def _log_mixture(log_q, log_p, log_1mb, log_b):
    a = log_q + log_1mb
    b = log_p + log_b
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _kd_jsd_kernel(
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, stats_ptr, part_ptr,
    N, V, HS, HT, stride_sh, stride_sw, stride_th, stride_tw, v_per_split,
    inv_temp, logit_scale, softcap, t_logit_scale, t_softcap, beta, log_1mb, log_b,
    HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TSOFTCAP: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m_s, log_s_s = _load_stat(stats_ptr, rows, row_mask, 2), _load_stat(stats_ptr, rows, row_mask, 3)
    m_t, log_s_t = _load_stat(stats_ptr, rows, row_mask, 4), _load_stat(stats_ptr, rows, row_mask, 5)
    jsd = tl.zeros((BLOCK_N,), tl.float32)
    kl_qm = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        mask = row_mask[:, None] & col_mask[None, :]
        z = _logits_tile(sh_ptr, sw_ptr, sb_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw,
                         logit_scale, softcap, HAS_SB, HAS_SOFTCAP, PRECISION_S, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        t = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, row_mask, col_mask, HT, stride_th, stride_tw,
                         t_logit_scale, t_softcap, HAS_TB, HAS_TSOFTCAP, PRECISION_T, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        log_q = _centred_log_softmax(z * inv_temp, m_s, log_s_s)
        log_p = _centred_log_softmax(t * inv_temp, m_t, log_s_t)
        log_m = _log_mixture(log_q, log_p, log_1mb, log_b)
        q = tl.exp(log_q)
        term_q = tl.where(mask, q * (log_q - log_m), 0.0)
        term_p = tl.where(mask, tl.exp(log_p) * (log_p - log_m), 0.0)
        jsd += tl.sum(beta * term_p + (1.0 - beta) * term_q, 1)
        kl_qm += tl.sum(term_q, 1)
    base = part_ptr + pid_s * 2 * N + rows
    tl.store(base, jsd, mask=row_mask)
    tl.store(base + N, kl_qm, mask=row_mask)


@triton.jit
def _kd_bwd_kernel(
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, stats_ptr, wce_ptr, wkd_ptr, glse_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, HS, HT, stride_sh, stride_sw, stride_th, stride_tw,
    inv_temp, logit_scale, softcap, t_logit_scale, t_softcap, beta, log_1mb, log_b,
    CE_GRAD: tl.constexpr, KD_DENSE: tl.constexpr, KD_TOPK: tl.constexpr, DIV: tl.constexpr,
    HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TSOFTCAP: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    z = _logits_tile(sh_ptr, sw_ptr, sb_ptr, rows, cols, row_mask, col_mask, HS, stride_sh, stride_sw,
                     logit_scale, softcap, HAS_SB, HAS_SOFTCAP, PRECISION_S, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if CE_GRAD:
        label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        m_z, log_s_z = _load_stat(stats_ptr, rows, row_mask, 0), _load_stat(stats_ptr, rows, row_mask, 1)
        w_ce = tl.load(wce_ptr + rows, mask=row_mask, other=0.0)
        p_z = tl.exp(_centred_log_softmax(z, m_z, log_s_z))
        dz += w_ce[:, None] * (p_z - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
    if KD_DENSE or KD_TOPK:
        m_s, log_s_s = _load_stat(stats_ptr, rows, row_mask, 2), _load_stat(stats_ptr, rows, row_mask, 3)
        log_q = _centred_log_softmax(z * inv_temp, m_s, log_s_s)
        q = tl.exp(log_q)
    if KD_DENSE:
        m_t, log_s_t = _load_stat(stats_ptr, rows, row_mask, 4), _load_stat(stats_ptr, rows, row_mask, 5)
        aux = _load_stat(stats_ptr, rows, row_mask, 6)
        w_kd = tl.load(wkd_ptr + rows, mask=row_mask, other=0.0)
        t = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, cols, row_mask, col_mask, HT, stride_th, stride_tw,
                         t_logit_scale, t_softcap, HAS_TB, HAS_TSOFTCAP, PRECISION_T, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        log_p = _centred_log_softmax(t * inv_temp, m_t, log_s_t)
        if DIV == 0:
            g = q - tl.exp(log_p)
        elif DIV == 1:
            g = q * (log_q - log_p - aux[:, None])
        else:
            log_m = _log_mixture(log_q, log_p, log_1mb, log_b)
            g = (1.0 - beta) * q * (log_q - log_m - aux[:, None])
        dz += w_kd[:, None] * g
    if KD_TOPK:
        g_lse = tl.load(glse_ptr + rows, mask=row_mask, other=0.0)
        dz += g_lse[:, None] * q
    if HAS_SOFTCAP:
        r = z / softcap
        dz = dz * (logit_scale * (1.0 - r * r))
    else:
        dz = dz * logit_scale
    dz = tl.where(mask, dz, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_mask)
    dz_in = dz.to(sw_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[:, None]
    for k0 in range(0, HS, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < HS
        if NEED_DH:
            w = tl.load(sw_ptr + cols64 * stride_sw + ks[None, :], mask=col_mask[:, None] & kmask[None, :], other=0.0)
            part = _dot(dz_in, w, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), PRECISION_S, UPCAST)
            tl.atomic_add(dh_ptr + rows64 * HS + ks[None, :], part, mask=row_mask[:, None] & kmask[None, :])
        if NEED_DW:
            h = tl.load(sh_ptr + rows64 * stride_sh + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
            part = _dot(tl.trans(dz_in), h, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), PRECISION_S, UPCAST)
            tl.atomic_add(dw_ptr + cols64 * HS + ks[None, :], part, mask=col_mask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------------------------------- launchers


def _blocks(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8)
    # interpreter: small tiles so that tiny test shapes still cross tile boundaries in every dimension
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, num_warps=1)


# Tests set this to force several vocab splits on small shapes (exercises _combine).
FORCE_SPLITS: int | None = None


def _num_splits(n_blocks: int, vocab: int, block_v: int, device: torch.device) -> int:
    tiles = triton.cdiv(vocab, block_v)
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(4 * sms, n_blocks)))


def rows_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with unit stride in its last dim (what the kernels' row pointers assume); a copy only if needed."""
    return None if x is None else (x if x.stride(-1) == 1 else x.contiguous())


class Head(NamedTuple):
    """One model's ``lm_head`` as the launchers take it: logits ``softcap(logit_scale * (hidden weight^T + bias))``
    (``softcap(x) = c tanh(x / c)``, none when ``softcap`` is None)."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    logit_scale: float = 1.0
    softcap: float | None = None


def _common(student: Head, teacher: Head | None, temperature: float) -> dict:
    sh, sw, sb = (rows_contiguous(x) for x in student[:3])
    dense = teacher is not None
    th, tw, tb = (rows_contiguous(x) for x in teacher[:3]) if dense else (None, None, None)
    t_logit_scale, t_softcap = (teacher.logit_scale, teacher.softcap) if dense else (1.0, None)
    return dict(
        sh_ptr=sh, sw_ptr=sw, sb_ptr=sb if sb is not None else sw,
        th_ptr=th if dense else sh, tw_ptr=tw if dense else sw,
        tb_ptr=tb if tb is not None else (tw if dense else sw),
        N=sh.shape[0], V=sw.shape[0], HS=sh.shape[1], HT=th.shape[1] if dense else 1,
        stride_sh=sh.stride(0), stride_sw=sw.stride(0),
        stride_th=th.stride(0) if dense else 0, stride_tw=tw.stride(0) if dense else 0,
        inv_temp=1.0 / temperature, logit_scale=student.logit_scale,
        softcap=student.softcap if student.softcap is not None else 1.0, t_logit_scale=t_logit_scale,
        t_softcap=t_softcap if t_softcap is not None else 1.0,
        HAS_SB=sb is not None, HAS_TB=tb is not None,
        HAS_SOFTCAP=student.softcap is not None, HAS_TSOFTCAP=t_softcap is not None,
        PRECISION_S=fp32_precision(sh.dtype), PRECISION_T=fp32_precision(th.dtype if dense else sh.dtype),
        UPCAST=sh.device.type != "cuda",
    )


def _combine_max(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    big_m = m.max(0).values
    w = torch.exp(m - big_m)
    return big_m, (s * w).sum(0), w


def _combine(part: torch.Tensor, divergence: int, has_labels: bool, has_kd: bool, dense: bool) -> dict:
    """Merge per-split partial statistics [splits, 9, N] into per-row (max, log sum-exp - max) pairs (see
    :data:`ROW_STATS`), the label logit and the KL values."""
    m_z, s_z, m_s, s_s, m_t, s_t, a, b, z_lab = part.unbind(1)
    out = {}
    if has_labels:
        out["m_z"], tot, _ = _combine_max(m_z, s_z)
        out["logS_z"] = torch.log(tot)
        out["z_label"] = z_lab.sum(0)
    if has_kd:
        big_s, tot_s, w_s = _combine_max(m_s, s_s)
        out["m_s"], out["logS_s"] = big_s, torch.log(tot_s)
        if dense:
            big_t, tot_t, w_t = _combine_max(m_t, s_t)
            out["m_t"], out["logS_t"] = big_t, torch.log(tot_t)
            # re-centre each split's sums on the global maxima (same shift as inside the kernel)
            shift = (big_t - m_t) - (big_s - m_s)
            if divergence == FORWARD_KL:
                acc = (w_t * (a - shift * s_t)).sum(0)
                out["value"] = acc / tot_t - torch.log(tot_t) + torch.log(tot_s)
            elif divergence == REVERSE_KL:
                acc = (w_s * (b + shift * s_s)).sum(0)
                out["value"] = acc / tot_s - torch.log(tot_s) + torch.log(tot_t)
    return out


def kd_forward(
    student: Head,
    teacher: Head | None,
    labels: torch.Tensor | None,
    *,
    has_kd: bool,
    divergence: int,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Row statistics of the student's logits ``z`` and a dense teacher's ``t`` (each a :class:`Head`).

    Args: ``student`` (``hidden [N, Hs]``, ``weight [V, Hs]``), ``teacher`` (``hidden [N, Ht]``, ``weight
    [V, Ht]``) or None, ``labels [N] int64 | None``; ``has_kd``: compute the tempered student's statistics (also
    for a sparse teacher, ``teacher`` None); ``divergence``: a code (:data:`FORWARD_KL` ...); ``temperature``
    divides both models' logits in the KD statistics. ``N > 0``.

    Returns ``(ce [N] | None, value [N] | None, stats [N, NUM_ROW_STATS])``, fp32: per-row CE
    ``logsumexp(z) - z[label]`` (not masked: rows whose label matches no column give ``logsumexp(z)``), the
    dense teacher's divergence (tempered, without ``T^2``), and the :data:`ROW_STATS` (0 where absent).
    """
    sh = student.hidden
    n, vocab = sh.shape[0], student.weight.shape[0]
    dev = sh.device
    stats = torch.zeros(n, NUM_ROW_STATS, dtype=torch.float32, device=dev)
    has_labels = labels is not None
    dense = teacher is not None
    blk = _blocks(dev)
    n_blocks = triton.cdiv(n, blk["BLOCK_N"])
    splits = _num_splits(n_blocks, vocab, blk["BLOCK_V"], dev)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), blk["BLOCK_V"]) * blk["BLOCK_V"]
    splits = triton.cdiv(vocab, v_per_split)
    common = _common(student, teacher, temperature)
    part = torch.empty(splits, NUM_PARTS, n, dtype=torch.float32, device=dev)
    _kd_stats_kernel[(n_blocks, splits)](
        labels_ptr=labels if has_labels else sh, part_ptr=part, v_per_split=v_per_split,
        HAS_LABELS=has_labels, HAS_KD=has_kd, HAS_TEACHER=dense, SAME_T=temperature == 1.0,
        DIV=divergence, **common, **blk,
    )
    st = _combine(part, divergence, has_labels, has_kd, dense)
    for j, name in enumerate(ROW_STATS[:-1]):
        if name in st:
            stats[:, j] = st[name]
    aux = ROW_STATS.index("aux")
    ce = value = None
    if has_labels:  # (m - z_label) + log S: the large parts cancel first
        ce = (st["m_z"] - st["z_label"]) + st["logS_z"]
    if has_kd and dense:
        if divergence == JSD:
            jpart = torch.empty(splits, 2, n, dtype=torch.float32, device=dev)
            _kd_jsd_kernel[(n_blocks, splits)](
                stats_ptr=stats, part_ptr=jpart,
                v_per_split=v_per_split, beta=beta, log_1mb=math.log1p(-beta), log_b=math.log(beta),
                **common, **blk,
            )
            value, stats[:, aux] = jpart.sum(0).unbind(0)
        else:
            value = st["value"]
            if divergence == REVERSE_KL:
                stats[:, aux] = value
    return ce, value, stats


def kd_backward(
    student: Head,
    teacher: Head | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    w_ce: torch.Tensor | None,
    w_kd: torch.Tensor | None,
    g_lse: torch.Tensor | None,
    *,
    divergence: int,
    beta: float,
    temperature: float,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``(dh [N, Hs], dW [V, Hs], db [V])`` (None where not needed) of
    ``sum_i w_ce_i CE_i + w_kd_i D_i + g_lse_i lse(s_i)`` with respect to the student's raw logits.

    ``stats``: :func:`kd_forward`'s; ``w_ce [N]`` fp32 CE weights (0 on ignored rows) or None; ``w_kd [N]`` fp32
    weights of the dense teacher's divergence, already divided by ``T`` (the gradient is taken with respect to the
    tempered logits) or None; ``g_lse [N]`` fp32 weight of the tempered student's ``q`` (the dense part of a
    sparse teacher's gradient, its sparse part is the caller's) or None.
    """
    sh = student.hidden
    n, vocab, hs = sh.shape[0], student.weight.shape[0], sh.shape[1]
    dev = sh.device
    dh = torch.zeros(n, hs, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(vocab, hs, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    if n > 0 and (need_dh or need_dw or need_db):
        blk = _blocks(dev)
        common = _common(student, teacher, temperature)
        grid = (triton.cdiv(n, blk["BLOCK_N"]), triton.cdiv(vocab, blk["BLOCK_V"]))
        beta = beta if divergence == JSD else 0.5
        _kd_bwd_kernel[grid](
            labels_ptr=labels if labels is not None else sh, stats_ptr=stats.contiguous(),
            wce_ptr=w_ce.contiguous() if w_ce is not None else stats,
            wkd_ptr=w_kd.contiguous() if w_kd is not None else stats,
            glse_ptr=g_lse.contiguous() if g_lse is not None else stats,
            dh_ptr=dh if need_dh else stats, dw_ptr=dw if need_dw else stats,
            db_ptr=db if need_db else stats,
            beta=beta, log_1mb=math.log1p(-beta), log_b=math.log(beta),
            CE_GRAD=w_ce is not None, KD_DENSE=w_kd is not None, KD_TOPK=g_lse is not None, DIV=divergence,
            NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, **common, **blk,
        )
    return dh, dw, db
