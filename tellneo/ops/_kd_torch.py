"""Token-chunked, memory-bounded PyTorch implementation of :func:`tellneo.ops.fused_linear_kd` (backend "torch").

Rows are processed in chunks of ``chunk_rows`` tokens: each chunk materialises its own ``[chunk, V]`` student and
teacher logits, evaluates CE and the divergence with :mod:`tellneo.ops.divergences`, and, when gradients are
wanted, turns the closed-form ``d loss / d logits`` straight into ``d hidden`` (``[chunk, Hs]``) and accumulates
``d weight`` in fp32. Nothing ``[N, V]`` ever exists; peak extra memory is a handful of ``[chunk, V]`` fp32
temporaries plus the fp32 ``dW`` accumulator.

Two modes (the custom op in :mod:`tellneo.ops._kd_op` picks one):

* fused (scalar reductions): gradients are computed in the forward, while the logits are at hand, for the loss
  ``grad_scale * sum_i valid_i [(1 - alpha) CE_i + alpha KD_i]``; the backward only scales them by the incoming
  scalar gradient. Costs one student and one teacher matmul fewer than recomputing.
* recompute (``reduction="none"`` or gradients of per-row outputs): the forward keeps O(N) statistics and the
  backward recomputes each chunk's logits with per-row weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tellneo.ops._kd_args import KDConfig, KDInputs
from tellneo.ops.divergences import (
    compute_dtype,
    kd_per_token,
    kd_per_token_and_grad,
    topk_kd_per_token,
    topk_kd_per_token_and_grad,
    transform_grad_factor,
    transform_logits,
)

# Elements of one [chunk, V] fp32 temporary: 4 Mi elements = 16 MiB; the chunk path keeps ~5 of them alive.
CHUNK_ELEMENTS = 1 << 22
NUM_STATS = 4  # per-row statistics: lse_z (CE logits), lse_s (tempered student), lse_t (tempered teacher), aux


def chunk_rows_for(vocab: int, n: int, chunk_elements: int | None = None) -> int:
    """Rows per chunk: a power of two in [8, 1024] whose [rows, vocab] slab is about ``chunk_elements``."""
    budget = chunk_elements or CHUNK_ELEMENTS
    rows = 8
    while rows < 1024 and rows * 2 * vocab <= budget:
        rows *= 2
    return max(1, min(rows, n))


def cdtype_of(inp: KDInputs) -> torch.dtype:
    dt = compute_dtype(inp.student_hidden.dtype)
    if inp.teacher_hidden is not None and inp.teacher_hidden.dtype == torch.float64:
        dt = torch.float64
    return dt


def valid_mask(inp: KDInputs, cfg: KDConfig) -> torch.Tensor:
    if inp.labels is None:
        return torch.ones(inp.student_hidden.shape[0], dtype=torch.bool, device=inp.student_hidden.device)
    return inp.labels != cfg.ignore_index


def _chunk(
    inp: KDInputs,
    cfg: KDConfig,
    r0: int,
    r1: int,
    w_ce: torch.Tensor | None,
    w_kd: torch.Tensor | None,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CE, KD (with kd_scale) and stats of rows [r0, r1); with ``want_grad``, also ``d(sum w_ce CE + w_kd KD)/dz``
    for the student's raw logits ``z = h W^T + b`` (``[rows, V]``, compute dtype). A ``None`` weight means zero."""
    cdt = cdtype_of(inp)
    h = inp.student_hidden[r0:r1]
    rows = r1 - r0
    dev = h.device
    labels = inp.labels[r0:r1] if inp.labels is not None else None
    valid = labels != cfg.ignore_index if labels is not None else torch.ones(rows, dtype=torch.bool, device=dev)

    z = transform_logits(F.linear(h, inp.student_weight, inp.student_bias).to(cdt), cfg.logit_scale, cfg.softcap)
    stats = torch.zeros(rows, NUM_STATS, dtype=cdt, device=dev)
    ce = torch.zeros(rows, dtype=cdt, device=dev)
    kd = torch.zeros(rows, dtype=cdt, device=dev)
    dz = None
    T = cfg.temperature

    if labels is not None:
        lse_z = torch.logsumexp(z, dim=-1)
        safe = torch.where(valid, labels, 0)
        ce = torch.where(valid, lse_z - z.gather(1, safe[:, None]).squeeze(1), 0.0)
        stats[:, 0] = lse_z
        if want_grad and w_ce is not None:
            wc = torch.where(valid, w_ce, 0.0).to(cdt)
            dz = torch.exp(z - lse_z[:, None]).mul_(wc[:, None])
            dz.scatter_add_(1, safe[:, None], -wc[:, None])

    if inp.has_teacher:
        s = z / T if T != 1.0 else z
        lse_s = stats[:, 0] if (T == 1.0 and labels is not None) else torch.logsumexp(s, dim=-1)
        stats[:, 1] = lse_s
        kd_grad = want_grad and w_kd is not None
        wk = torch.where(valid, w_kd, 0.0).to(cdt) * (cfg.kd_scale / T) if kd_grad else None
        if inp.teacher_weight is not None:
            t = transform_logits(
                F.linear(inp.teacher_hidden[r0:r1], inp.teacher_weight, inp.teacher_bias).to(cdt),
                cfg.logit_scale, cfg.softcap,
            )
            if T != 1.0:
                t = t / T
            lse_t = torch.logsumexp(t, dim=-1)
            stats[:, 2] = lse_t
            log_q = s - lse_s[:, None]
            log_p = t.sub_(lse_t[:, None])
            if kd_grad:
                value, grad = kd_per_token_and_grad(log_q, log_p, cfg.divergence, cfg.beta)
                grad.mul_(wk[:, None])
                dz = grad if dz is None else dz.add_(grad)
            else:
                value = kd_per_token(log_q, log_p, cfg.divergence, cfg.beta)
            stats[:, 3] = _aux_stat(log_q, log_p, value, cfg)
        else:
            ids = inp.topk_ids[r0:r1]
            lps = inp.topk_logprobs[r0:r1].to(cdt)
            s_ids = s.gather(1, ids)
            if kd_grad:
                value, g_ids, g_lse = topk_kd_per_token_and_grad(s_ids, lse_s, lps, cfg.divergence, cfg.beta)
                g_ids.mul_(wk[:, None])
                g_lse.mul_(wk)
                # dD/ds_j = dD/dlse * q_j + [j in ids] dD/ds_ids
                grad = torch.exp(s - lse_s[:, None]).mul_(g_lse[:, None])
                grad.scatter_add_(1, ids, g_ids)
                dz = grad if dz is None else dz.add_(grad)
            else:
                value = topk_kd_per_token(s_ids, lse_s, lps, cfg.divergence, cfg.beta)
        kd = torch.where(valid, value * cfg.kd_scale, 0.0)

    if want_grad:
        if dz is None:
            dz = torch.zeros_like(z)
        factor = transform_grad_factor(z, cfg.logit_scale, cfg.softcap)
        if isinstance(factor, torch.Tensor):
            dz.mul_(factor)
        elif factor != 1.0:
            dz.mul_(factor)
    return ce, kd, stats, dz


def _aux_stat(log_q: torch.Tensor, log_p: torch.Tensor, value: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """The per-row statistic the backward of each divergence needs (see divergences' module docstring)."""
    if cfg.divergence == "reverse_kl":
        return value
    if cfg.divergence == "jsd":
        from tellneo.ops.divergences import _mixture_log_probs

        log_m = _mixture_log_probs(log_q, log_p, cfg.beta)
        return (log_q.exp() * (log_q - log_m)).sum(-1)
    return torch.zeros_like(value)


class _GradAccumulator:
    """dh rows (input dtype), dW / db accumulated in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, inp: KDInputs, need_dh: bool, need_dw: bool, need_db: bool) -> None:
        sh, sw = inp.student_hidden, inp.student_weight
        acc = torch.float64 if sw.dtype == torch.float64 else torch.float32
        self.inp = inp
        self.dh = torch.empty_like(sh) if need_dh else None
        self.dw = torch.zeros(sw.shape, dtype=acc, device=sw.device) if need_dw else None
        self.db = torch.zeros(sw.shape[0], dtype=acc, device=sw.device) if need_db else None

    def add(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        h, w = self.inp.student_hidden[r0:r1], self.inp.student_weight
        if self.dh is not None:
            # matmul in the weight's dtype (a [V, Hs] upcast would cost more than the whole chunk), fp32 accumulate
            torch.matmul(dz.to(w.dtype), w, out=self.dh[r0:r1])
        if self.dw is not None:
            self.dw.addmm_(dz.t(), h.to(self.dw.dtype))
        if self.db is not None:
            self.db.add_(dz.sum(0))

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        dt = self.inp.student_weight.dtype
        dw = self.dw.to(dt) if self.dw is not None else None
        db = self.db.to(dt) if self.db is not None else None
        return self.dh, dw, db


def forward(
    inp: KDInputs,
    cfg: KDConfig,
    *,
    grad_scale: torch.Tensor | None = None,
    need_dh: bool = False,
    need_dw: bool = False,
    need_db: bool = False,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Per-row ``(ce [N], kd [N], stats [N, 4])`` and, when ``grad_scale`` is given and a ``need_*`` flag is set,
    the gradients ``(dh, dw, db)`` of ``grad_scale * sum_i valid_i [(1-alpha) ce_i + alpha kd_i]``."""
    n = inp.student_hidden.shape[0]
    cdt = cdtype_of(inp)
    dev = inp.student_hidden.device
    ce = torch.zeros(n, dtype=cdt, device=dev)
    kd = torch.zeros(n, dtype=cdt, device=dev)
    stats = torch.zeros(n, NUM_STATS, dtype=cdt, device=dev)
    fused = grad_scale is not None and (need_dh or need_dw or need_db)
    acc = _GradAccumulator(inp, need_dh, need_dw, need_db) if fused else None
    if fused:
        gs = grad_scale.to(device=dev, dtype=cdt).reshape(())
        w_ce_all = ((1.0 - cfg.alpha) * gs).expand(n) if cfg.alpha < 1.0 else None
        w_kd_all = (cfg.alpha * gs).expand(n) if cfg.alpha > 0.0 else None
    step = chunk_rows_for(inp.student_weight.shape[0], n, chunk_elements)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wc = w_ce_all[r0:r1] if fused and w_ce_all is not None else None
        wk = w_kd_all[r0:r1] if fused and w_kd_all is not None else None
        ce[r0:r1], kd[r0:r1], stats[r0:r1], dz = _chunk(inp, cfg, r0, r1, wc, wk, fused)
        if fused:
            acc.add(r0, r1, dz)
    grads = acc.result() if fused else (None, None, None)
    return ce, kd, stats, grads


def backward(
    inp: KDInputs,
    cfg: KDConfig,
    w_ce: torch.Tensor | None,
    w_kd: torch.Tensor | None,
    *,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i valid_i (w_ce_i ce_i + w_kd_i kd_i)`` by recomputing each chunk's logits (a ``None``
    weight vector means zero)."""
    n = inp.student_hidden.shape[0]
    acc = _GradAccumulator(inp, need_dh, need_dw, need_db)
    step = chunk_rows_for(inp.student_weight.shape[0], n, chunk_elements)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wc = w_ce[r0:r1] if w_ce is not None else None
        wk = w_kd[r0:r1] if w_kd is not None else None
        _, _, _, dz = _chunk(inp, cfg, r0, r1, wc, wk, True)
        acc.add(r0, r1, dz)
    return acc.result()
