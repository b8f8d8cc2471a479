"""Backend "triton" of :func:`tellneo.ops.fused_linear_kd`: the PyTorch side of the Triton kernels.

The launchers in :mod:`tellneo.kernels.fused_linear_kd` take plain tensors and scalars and know nothing of
ignored rows, ``T^2`` or sparse teachers. This module turns one call's :class:`~tellneo.ops._kd_args.KDInputs` /
:class:`~tellneo.ops._kd_args.KDConfig` into launcher arguments, masks ignored rows, and runs the sparse (top-k)
teacher's ``k + 1``-bucket math in PyTorch on ``[N, k]`` tensors (rows chunked) with the definitions of
:mod:`tellneo.ops.divergences`: its value from the kernels' student statistics, and the sparse part of its
gradient scattered into ``dh`` / ``dW`` / ``db`` next to the kernel's dense part.
"""

from __future__ import annotations

import torch

from tellneo.ops import divergences as D
from tellneo.ops._kd_args import KDConfig, KDInputs, valid_mask


def _kernels():
    from tellneo.kernels import fused_linear_kd as K

    return K


def num_row_stats() -> int:
    """Width of the per-row statistics :func:`forward` hands to :func:`backward`."""
    return _kernels().NUM_ROW_STATS


def _contiguous(inp: KDInputs) -> KDInputs:
    c = _kernels().rows_contiguous
    return KDInputs(c(inp.student_hidden), c(inp.student_weight), c(inp.student_bias), c(inp.teacher_hidden),
                    c(inp.teacher_weight), c(inp.teacher_bias), inp.labels, inp.topk_ids, inp.topk_logprobs,
                    inp.lead_shape)


def _launch_args(inp: KDInputs, cfg: KDConfig) -> tuple[tuple, dict]:
    """``(student Head, teacher Head | None, labels)`` and the scalar keywords shared by both launchers."""
    K = _kernels()
    student = K.Head(inp.student_hidden, inp.student_weight, inp.student_bias, cfg.logit_scale, cfg.softcap)
    teacher = None
    if inp.teacher_weight is not None:
        teacher = K.Head(inp.teacher_hidden, inp.teacher_weight, inp.teacher_bias, cfg.teacher_logit_scale,
                         cfg.teacher_softcap)
    scalars = dict(divergence=D.DIVERGENCES.index(cfg.divergence), beta=cfg.beta, temperature=cfg.temperature)
    return (student, teacher, inp.labels), scalars


def gather_student_logits(inp: KDInputs, cfg: KDConfig, ids: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """``transform(h_i . W[ids_ik] + b[ids_ik])`` as ``[N, k]`` fp32, rows chunked so ``[rows, k, Hs]`` stays small."""
    sh, sw = inp.student_hidden, inp.student_weight
    n, k = ids.shape
    out = torch.empty(n, k, dtype=torch.float32, device=sh.device)
    step = max(1, max_elements // max(1, k * sh.shape[1]))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = sw[ids[r0:r1]].float()  # [rows, k, Hs]
        out[r0:r1] = torch.bmm(w, sh[r0:r1].float().unsqueeze(-1)).squeeze(-1)
    if inp.student_bias is not None:
        out += inp.student_bias.float()[ids]
    return D.transform_logits(out, cfg.logit_scale, cfg.softcap)


def _centred_topk_logits(
    inp: KDInputs, cfg: KDConfig, stats: torch.Tensor, z_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse teacher's inputs ``(s_ids - m_s [N, k], log S_s [N])``: the tempered student logits at the top-k
    ids and their logsumexp, both shifted by the row max ``m_s`` (the top-k math depends only on ``s - lse``)."""
    row_stats = _kernels().ROW_STATS
    if z_ids is None:
        z_ids = gather_student_logits(inp, cfg, inp.topk_ids)
    m_s = stats[:, row_stats.index("m_s")]
    return z_ids / cfg.temperature - m_s[:, None], stats[:, row_stats.index("logS_s")]


def forward(inp: KDInputs, cfg: KDConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(ce [N], kd [N], stats [N, num_row_stats()])`` (fp32; 0 on ignored rows; kd includes kd_scale;
    stats as the kernels' ``ROW_STATS``, 0 where a part is absent)."""
    K = _kernels()
    inp = _contiguous(inp)
    n = inp.student_hidden.shape[0]
    dev = inp.student_hidden.device
    ce = torch.zeros(n, dtype=torch.float32, device=dev)
    kd = torch.zeros(n, dtype=torch.float32, device=dev)
    if n == 0:
        return ce, kd, torch.zeros(n, K.NUM_ROW_STATS, dtype=torch.float32, device=dev)
    valid = valid_mask(inp, cfg)
    heads, scalars = _launch_args(inp, cfg)
    ce_rows, value, stats = K.kd_forward(*heads, has_kd=inp.has_teacher, **scalars)
    if ce_rows is not None:
        ce = torch.where(valid, ce_rows, 0.0)
    if inp.has_teacher:
        if inp.teacher_weight is None:
            s_ids, lse = _centred_topk_logits(inp, cfg, stats)
            value = D.topk_kd_per_token(s_ids, lse, inp.topk_logprobs.float(), cfg.divergence, cfg.beta)
        kd = torch.where(valid, value * cfg.kd_scale, 0.0)
    return ce, kd, stats


def backward(
    inp: KDInputs,
    cfg: KDConfig,
    stats: torch.Tensor,
    w_ce: torch.Tensor | None,
    w_kd: torch.Tensor | None,
    *,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i valid_i (w_ce_i ce_i + w_kd_i kd_i)``; dh/dW/db accumulated in fp32, returned in the
    inputs' dtypes."""
    K = _kernels()
    inp = _contiguous(inp)
    sh, sw = inp.student_hidden, inp.student_weight
    n = sh.shape[0]
    wce = wkd = glse = g_ids = None
    topk = False
    if n > 0 and (need_dh or need_dw or need_db):
        valid = valid_mask(inp, cfg)
        if inp.labels is not None and w_ce is not None:
            wce = torch.where(valid, w_ce.float(), 0.0).contiguous()
        if inp.has_teacher and w_kd is not None:
            wkd = (torch.where(valid, w_kd.float(), 0.0) * (cfg.kd_scale / cfg.temperature)).contiguous()
            topk = inp.teacher_weight is None
        if topk:
            z_ids = gather_student_logits(inp, cfg, inp.topk_ids)
            s_ids, lse = _centred_topk_logits(inp, cfg, stats, z_ids)
            _, g_ids, g_lse = D.topk_kd_per_token_and_grad(
                s_ids, lse, inp.topk_logprobs.float(), cfg.divergence, cfg.beta
            )
            glse = (g_lse * wkd).contiguous()
            g_ids = g_ids * wkd[:, None] * D.transform_grad_factor(z_ids, cfg.logit_scale, cfg.softcap)
            wkd = None
    heads, scalars = _launch_args(inp, cfg)
    dh, dw, db = K.kd_backward(*heads, stats, wce, wkd, glse, need_dh=need_dh, need_dw=need_dw, need_db=need_db,
                               **scalars)
    if topk:
        _scatter_topk_grads(inp, inp.topk_ids, g_ids, dh, dw, db)
    return (
        dh.to(sh.dtype) if dh is not None else None,
        dw.to(sw.dtype) if dw is not None else None,
        db.to(sw.dtype) if db is not None else None,
    )


def _scatter_topk_grads(inp: KDInputs, ids: torch.Tensor, g: torch.Tensor, dh, dw, db, max_elements: int = 1 << 24):
    """The sparse part of a top-k teacher's gradient: ``dz[i, ids_ik] += g_ik`` turned into dh / dW / db."""
    sh, sw = inp.student_hidden, inp.student_weight
    n, k = ids.shape
    step = max(1, max_elements // max(1, k * sh.shape[1]))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        gi, idx = g[r0:r1], ids[r0:r1]
        if dh is not None:
            dh[r0:r1] += torch.bmm(gi.unsqueeze(1), sw[idx].float()).squeeze(1)
        if dw is not None:
            outer = gi.unsqueeze(-1) * sh[r0:r1].float().unsqueeze(1)  # [rows, k, Hs]
            dw.index_add_(0, idx.reshape(-1), outer.reshape(-1, sh.shape[1]))
    if db is not None:
        db.index_add_(0, ids.reshape(-1), g.reshape(-1))
