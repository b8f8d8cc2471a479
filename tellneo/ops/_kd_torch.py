"""Token-chunked, memory-bounded PyTorch implementation of :func:`tellneo.ops.fused_linear_kd` (backend "torch").

Rows are processed in chunks of ``chunk_rows`` tokens: each chunk materialises its own ``[chunk, V]`` student and
teacher logits, evaluates CE and the divergence with :mod:`tellneo.ops.divergences`, and, when gradients are
wanted, turns the closed-form ``d loss / d logits`` straight into ``d hidden`` (``[chunk, Hs]``) and accumulates
``d weight`` in fp32. Nothing ``[N, V]`` ever exists: the chunk's slabs live in a workspace allocated once per
call and reused by every chunk (5 ``[chunk, V]`` fp32 slabs, up to 9 with temperature and softcap; ``chunk * V``
about :data:`CHUNK_ELEMENTS`), plus the fp32 ``dW`` accumulator; elementwise work is done in place, because
fresh multi-MB temporaries per chunk cost more in page faults than the arithmetic.

Two modes (the custom op in :mod:`tellneo.ops._kd_op` picks one):

* fused (scalar reductions): gradients are computed in the forward, while the logits are at hand, for the loss
  ``grad_scale * sum_i valid_i [(1 - alpha) CE_i + alpha KD_i]``; the backward only scales them, in place, by the
  incoming scalar gradient. Costs one student and one teacher matmul fewer than recomputing; a second backward
  through the same (retained) graph raises autograd's in-place-modification error.
* recompute (``reduction="none"`` or gradients of per-row outputs): the forward keeps O(N) statistics and the
  backward recomputes each chunk's logits with per-row weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tellneo.ops._kd_args import KDConfig, KDInputs, valid_mask
from tellneo.ops.divergences import compute_dtype, kd_per_token_and_grad, topk_kd_per_token_and_grad

# Elements of one [chunk, V] workspace slab: 16 Mi (64 MiB in fp32); a call uses 5 slabs (up to 9 with T != 1
# and softcap).
# Large chunks mean few parallel regions: on a shared 2-core machine 4 Mi-element chunks ran ~30% slower under
# load than 16 Mi ones, at equal speed when idle.
CHUNK_ELEMENTS = 1 << 24
NUM_STATS = 4  # per-row statistics: lse_z (CE logits), lse_s (tempered student), lse_t (tempered teacher), aux


def chunk_rows_for(vocab: int, n: int, chunk_elements: int | None = None) -> int:
    """Rows per chunk: a power of two in [8, 1024] whose [rows, vocab] slab is about ``chunk_elements``."""
    budget = chunk_elements or CHUNK_ELEMENTS
    rows = 8
    while rows < 1024 and rows * 2 * vocab <= budget:
        rows *= 2
    return max(1, min(rows, n))


class _Workspace:
    """Preallocated ``[rows, V]`` compute-dtype slabs reused by every chunk of one call: fresh multi-MB
    allocations per chunk cost more in page faults than the arithmetic done in them."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, r: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return buf[:r]


def _logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, logit_scale: float,
                 softcap: float | None, inv_temp: float = 1.0) -> torch.Tensor:
    """``out = transform(x W^T + b) * inv_temp`` in the compute dtype, in place (``transform``: ``logit_scale``
    then ``softcap``, one model's). Half-precision inputs go through ``F.linear`` in their dtype first, so the
    logits are rounded exactly like the model's own ``lm_head``."""
    if x.dtype == out.dtype:
        torch.matmul(x, w.t(), out=out)
        if b is not None:
            out.add_(b)
    else:
        out.copy_(F.linear(x, w, b))
    if logit_scale != 1.0:
        out.mul_(logit_scale)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return out


def _log_softmax_into(x: torch.Tensor, log_out: torch.Tensor, prob_out: torch.Tensor) -> torch.Tensor:
    """``log_out = log_softmax(x)``, ``prob_out = softmax(x)`` row-wise (ATen's fused kernel); returns
    ``logsumexp(x) = max(x) - max(log_out)``, read at each row's maximum, where ``log_out`` is near 0 and exact."""
    torch.ops.aten._log_softmax.out(x, -1, False, out=log_out)
    torch.exp(log_out, out=prob_out)
    return x.amax(-1) - log_out.amax(-1)


def _chunk(
    inp: KDInputs,
    cfg: KDConfig,
    ws: _Workspace,
    r0: int,
    r1: int,
    w_ce: torch.Tensor | None,
    w_kd: torch.Tensor | None,
    want_grad: bool,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CE, KD (with kd_scale) and stats of rows [r0, r1); with ``want_grad``, also ``d(sum w_ce CE + w_kd KD)/dz``
    for the student's raw logits ``z = h W^T + b`` (``[rows, V]``, a workspace slab). A ``None`` weight means
    zero. ``valid``: the rows' :func:`~tellneo.ops._kd_args.valid_mask`."""
    cdt = ws.dtype
    h = inp.student_hidden[r0:r1]
    rows = r1 - r0
    dev = h.device
    labels = inp.labels[r0:r1] if inp.labels is not None else None
    T = cfg.temperature
    stats = torch.zeros(rows, NUM_STATS, dtype=cdt, device=dev)
    ce = torch.zeros(rows, dtype=cdt, device=dev)
    kd = torch.zeros(rows, dtype=cdt, device=dev)
    dz = None

    z = _logits_into(ws("z", rows), h, inp.student_weight, inp.student_bias, cfg.logit_scale, cfg.softcap)
    probs_z = log_z = None
    if labels is not None:
        log_z, probs_z = ws("log_q", rows), ws("q", rows)
        stats[:, 0] = _log_softmax_into(z, log_z, probs_z)
        safe = torch.where(valid, labels, 0)
        ce = torch.where(valid, -log_z.gather(1, safe[:, None]).squeeze(1), 0.0)

    if inp.has_teacher:
        kd_grad = want_grad and w_kd is not None
        if T == 1.0 and probs_z is not None:  # same distribution as CE's: reuse (log_q is consumed below)
            log_q, q, lse_s = log_z, probs_z, stats[:, 0]
        else:
            s = torch.mul(z, 1.0 / T, out=ws("s", rows)) if T != 1.0 else z
            log_q, q = ws("log_q_kd", rows), ws("q_kd", rows)
            lse_s = _log_softmax_into(s, log_q, q)
        stats[:, 1] = lse_s
        wk = torch.where(valid, w_kd, 0.0).to(cdt) * (cfg.kd_scale / T) if kd_grad else None
        if inp.teacher_weight is not None:
            # z is dead once its log-softmax is taken, unless softcap's gradient factor needs it at the end
            t_slab = ws("t", rows) if cfg.softcap is not None else z
            t = _logits_into(t_slab, inp.teacher_hidden[r0:r1], inp.teacher_weight, inp.teacher_bias,
                             cfg.teacher_logit_scale, cfg.teacher_softcap, 1.0 / T)
            log_p, p = ws("log_p", rows), ws("p", rows)
            stats[:, 2] = _log_softmax_into(t, log_p, p)
            value, grad, aux = kd_per_token_and_grad(
                log_q, log_p, cfg.divergence, cfg.beta, q=q, p=p, scratch=t, grad_weight=wk,
                need_grad=kd_grad, overwrite=True,
            )
            stats[:, 3] = aux
        else:
            ids = inp.topk_ids[r0:r1]
            # the top-k math depends on s - lse only: pass the log-probabilities and a zero logsumexp (no
            # round trip through lse, which at logits of +-1e4 is rounded to ~1e-3)
            lps = inp.topk_logprobs[r0:r1].to(cdt)
            value, g_ids, g_lse = topk_kd_per_token_and_grad(log_q.gather(1, ids), torch.zeros_like(lse_s), lps,
                                                             cfg.divergence, cfg.beta)
            grad = None
            if kd_grad:  # dD/ds_j = dD/dlse * q_j + [j in ids] dD/ds_ids
                grad = torch.mul(q, (g_lse * wk)[:, None], out=log_q)
                grad.scatter_add_(1, ids, g_ids * wk[:, None])
        dz = grad
        kd = torch.where(valid, value * cfg.kd_scale, 0.0)

    if want_grad:
        if labels is not None and w_ce is not None:
            wc = torch.where(valid, w_ce, 0.0).to(cdt)
            dz = probs_z.mul_(wc[:, None]) if dz is None else dz.addcmul_(probs_z, wc[:, None])
            dz.scatter_add_(1, safe[:, None], -wc[:, None])
        if dz is None:
            dz = ws("q", rows).zero_()
        if cfg.softcap is not None:  # d transform / dz = logit_scale (1 - (y / c)^2), y = transformed logits
            dz.mul_(z.div_(cfg.softcap).square_().neg_().add_(1.0).mul_(cfg.logit_scale))
        elif cfg.logit_scale != 1.0:
            dz.mul_(cfg.logit_scale)
    return ce, kd, stats, dz


class _GradAccumulator:
    """dh rows (input dtype), dW / db accumulated in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, inp: KDInputs, need_dh: bool, need_dw: bool, need_db: bool) -> None:
        sh, sw = inp.student_hidden, inp.student_weight
        acc = compute_dtype(sw.dtype)
        self.inp = inp
        self.dh = torch.empty_like(sh) if need_dh else None
        # empty, not zeros: the first chunk writes dW / db with out=, later chunks accumulate
        self.dw = torch.empty(sw.shape, dtype=acc, device=sw.device) if need_dw else None
        self.db = torch.empty(sw.shape[0], dtype=acc, device=sw.device) if need_db else None
        self.started = False

    def add(self, r0: int, r1: int, dz: torch.Tensor) -> None:
        h, w = self.inp.student_hidden[r0:r1], self.inp.student_weight
        if self.dh is not None:
            # matmul in the weight's dtype (a [V, Hs] upcast would cost more than the whole chunk), fp32 accumulate
            torch.matmul(dz.to(w.dtype), w, out=self.dh[r0:r1])
        if self.dw is not None:
            if self.started:
                self.dw.addmm_(dz.t(), h.to(self.dw.dtype))
            else:
                torch.mm(dz.t(), h.to(self.dw.dtype), out=self.dw)
        if self.db is not None:
            if self.started:
                self.db.add_(dz.sum(0))
            else:
                torch.sum(dz, 0, out=self.db)
        self.started = True

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not self.started:  # no rows at all
            for t in (self.dw, self.db):
                if t is not None:
                    t.zero_()
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
    cdt = inp.compute_dtype
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
    ws = _Workspace(step, inp.student_weight.shape[0], cdt, dev)
    valid = valid_mask(inp, cfg)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wc = w_ce_all[r0:r1] if fused and w_ce_all is not None else None
        wk = w_kd_all[r0:r1] if fused and w_kd_all is not None else None
        ce[r0:r1], kd[r0:r1], stats[r0:r1], dz = _chunk(inp, cfg, ws, r0, r1, wc, wk, fused, valid[r0:r1])
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
    ws = _Workspace(step, inp.student_weight.shape[0], inp.compute_dtype, inp.student_hidden.device)
    valid = valid_mask(inp, cfg)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wc = w_ce[r0:r1] if w_ce is not None else None
        wk = w_kd[r0:r1] if w_kd is not None else None
        _, _, _, dz = _chunk(inp, cfg, ws, r0, r1, wc, wk, True, valid[r0:r1])
        acc.add(r0, r1, dz)
    return acc.result()
