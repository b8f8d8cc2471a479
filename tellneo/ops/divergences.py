"""Per-token distillation divergences: the PyTorch definition of tellneo's KD math.

Every PyTorch path computes its divergences here: :func:`kd_per_token` is the definition (plain autograd-able
formulas; the full-logits reference uses it), :func:`kd_per_token_and_grad` its closed-form value and gradient
for the token-chunked path (in place on ``[chunk, V]`` slabs, see its docstring for how the JSD mixture is
formed there), and the ``topk_*`` functions the same divergences over the ``k + 1`` buckets of a sparse teacher
(used by the torch path and by the PyTorch half of the Triton backend). The Triton kernels
(``tellneo.kernels.fused_linear_kd``) are the one other place: they evaluate the same closed forms tile by tile
(online, in fp32). Tests hold every form to :func:`kd_per_token` and its autograd gradient. The evaluation and
offline paths of the recipes call :func:`tellneo.ops.fused_linear_kd` / :func:`tellneo.ops.topk_logprobs`.

Notation, per token (one row), over the vocabulary ``j``:

* ``q = softmax(s)`` the student, ``p = softmax(t)`` the teacher, where ``s`` and ``t`` are the *tempered*
  logits (already transformed by ``logit_scale`` / ``softcap`` and divided by the temperature).
* ``forward_kl``: ``KL(p || q) = sum_j p_j (log p_j - log q_j)`` (mode covering; the LLM-NEO default).
* ``reverse_kl``: ``KL(q || p) = sum_j q_j (log q_j - log p_j)`` (mode seeking).
* ``jsd`` with ``beta`` in ``(0, 1)``, TRL's ``GKDTrainer.generalized_jsd_loss`` convention:
  ``m = beta * p + (1 - beta) * q`` and ``JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``.
  At the endpoints the mixture degenerates (``JSD_0 = JSD_1 = 0``), so, like TRL and Liger, ``beta = 0`` *means*
  forward ``KL(p || q)`` and ``beta = 1`` means reverse ``KL(q || p)``; :func:`canonical_divergence` maps them
  exactly (no ``log(0)``), so ``jsd`` at ``beta in {0, 1}`` is bit-for-bit the KL path.

Gradients with respect to the student's tempered logits ``s`` (``d/ds_j``), used by the chunked path and the
kernels instead of autograd (they need only the per-row value ``D`` as an extra statistic):

* forward KL: ``q_j - p_j``
* reverse KL: ``q_j (log q_j - log p_j - D)``
* JSD(beta):  ``q_j (g_j - sum_i q_i g_i)`` with ``g_j = (1 - beta) (log q_j - log m_j)``, and
  ``sum_i q_i g_i = (1 - beta) KL(q || m)``, the second per-row statistic the JSD path keeps.

All math runs in float32 (float64 inputs stay float64). Log-probabilities may contain :data:`LOG_FLOOR` for
"probability exactly zero" entries (padding of sparse teachers); every formula here maps those to exactly zero
contribution and zero gradient, with no ``0 * inf`` anywhere.
"""

from __future__ import annotations

import math

import torch

from tellneo._names import DIVERGENCES  # defined where the CLI can import it without torch

# log-probability used for "exactly zero probability": exp() of it is 0 in fp32 and fp64, and differences of two
# floors are exactly 0, so p * (log p - log q) is 0 instead of 0 * inf = nan.
LOG_FLOOR = -1.0e30


def canonical_divergence(divergence: str, beta: float) -> str:
    """Name of the formula actually evaluated: ``jsd`` at ``beta == 0`` / ``1`` is forward / reverse KL.

    >>> canonical_divergence("jsd", 0.0), canonical_divergence("jsd", 1.0), canonical_divergence("jsd", 0.5)
    ('forward_kl', 'reverse_kl', 'jsd')
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the KD math runs in for inputs of ``dtypes``: float64 if any is float64, else float32 (half
    types and float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def transform_logits(z: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``softcap * tanh(logit_scale * z / softcap)`` (or ``logit_scale * z`` without softcap), as the models do:
    Cohere-style ``logit_scale`` first, then Gemma-2-style final-logit soft-capping."""
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def transform_grad_factor(
    z_transformed: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None
) -> torch.Tensor | float:
    """``d transform(z) / dz`` expressed through the *transformed* logits: ``logit_scale * (1 - (y / softcap)^2)``."""
    if softcap is None:
        return logit_scale
    r = z_transformed / softcap
    return logit_scale * (1.0 - r * r)


def _mixture_log_probs(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m = log((1 - beta) q + beta p)`` in log space, exact where both probabilities underflow. The top-k
    gradient needs that: its tail term ``log Q_tail - log M_tail`` is not multiplied by ``Q_tail``, so a mixture
    clamped at the smallest normal (the chunked path's probability-space form, harmless there because every
    term is multiplied by ``q``) would turn a saturated tail into a large wrong gradient."""
    return torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))


def kd_per_token(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher ``p`` and student ``q`` from their log-probabilities ``[..., V]``.

    Returns ``[...]`` (summed over the last dim), differentiable by autograd. See the module docstring for the
    formulas and the ``beta`` convention. This is the definition every other path is tested against.
    """
    kind = canonical_divergence(divergence, beta)
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = _mixture_log_probs(log_q, log_p, beta)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    return (torch.mul(a, b, out=scratch) if scratch is not None else a * b).sum(-1)


def kd_per_token_and_grad(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    *,
    q: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None,
    need_grad: bool = True,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(D [...], dD/ds [..., V] or None, aux [...])`` in closed form, without autograd.

    ``D`` is :func:`kd_per_token`; the gradient is with respect to the student's tempered logits ``s`` (where
    ``log_q = log_softmax(s)``), multiplied row-wise by ``grad_weight`` when given; ``aux`` is the per-row
    statistic the gradient formula needs (``D`` for reverse KL, ``KL(q || m)`` for JSD, 0 for forward KL), which
    the Triton backward reads back from the forward.

    For speed on big ``[chunk, V]`` slabs the caller may pass the probabilities ``q = exp(log_q)`` /
    ``p = exp(log_p)`` it already has, a ``scratch`` buffer of the same shape, and ``overwrite=True``, which lets
    this function reuse ``log_q``, ``log_p``, ``p`` and ``scratch`` as work space (their contents are destroyed;
    the returned gradient aliases one of them). ``q`` is never modified. For JSD the mixture is formed in
    probability space, ``log m = log(1 - beta) + log(q + beta / (1 - beta) p)`` (clamped at the smallest normal so
    entries where both probabilities underflow contribute exactly 0; the constant is folded using
    ``sum p = sum q = 1``); the definition uses ``logaddexp`` and the tests hold the two together.
    """
    kind = canonical_divergence(divergence, beta)
    if q is None:
        q = log_q.exp()
    if not overwrite:
        log_q, log_p = log_q.clone(), log_p.clone()
        p = None if p is None else p.clone()
        scratch = None
    w = None if grad_weight is None else grad_weight.unsqueeze(-1)
    zeros = torch.zeros(log_q.shape[:-1], dtype=log_q.dtype, device=log_q.device)
    if kind == "forward_kl":
        if p is None:
            p = log_p.exp()
        value = _rowdot(p, log_p.sub_(log_q), scratch)
        grad = None
        if need_grad:  # q - p
            grad = torch.sub(q, p, out=p)
            if w is not None:
                grad.mul_(w)
        return value, grad, zeros
    if kind == "reverse_kl":
        diff = log_q.sub_(log_p)
        value = _rowdot(q, diff, scratch)
        grad = None
        if need_grad:  # q (log q - log p - D)
            grad = diff.sub_(value.unsqueeze(-1)).mul_(q)
            if w is not None:
                grad.mul_(w)
        return value, grad, value
    if p is None:
        p = log_p.exp()
    shift = math.log1p(-beta)  # log m = shift + log_mix
    tiny = torch.finfo(q.dtype).tiny
    log_mix = torch.add(q, p, alpha=beta / (1.0 - beta), out=scratch) if scratch is not None else q + p * (
        beta / (1.0 - beta))
    log_mix.clamp_min_(tiny).log_()
    kl_pm = _rowdot(p, log_p.sub_(log_mix), None if scratch is None else p) - shift
    g = log_q.sub_(log_mix)  # log q - log m + shift
    kl_qm_shifted = _rowdot(q, g, scratch)
    kl_qm = kl_qm_shifted - shift
    value = beta * kl_pm + (1.0 - beta) * kl_qm
    grad = None
    if need_grad:  # (1 - beta) q (log q - log m - KL(q || m)); the shifts cancel exactly (no fp round trip)
        grad = g.sub_(kl_qm_shifted.unsqueeze(-1)).mul_(q)
        grad.mul_((1.0 - beta) if w is None else w * (1.0 - beta))
    return value, grad, kl_qm


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``; ``x`` is clamped to ``<= -1e-30``
    so that a mass of exactly one gives a finite (very negative) log and a finite gradient."""
    x = x.clamp(max=-1e-30)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_bucket_log_probs(
    student_logits_at_ids: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over ``k + 1`` buckets for a sparse (top-k) teacher.

    The teacher is known only on its top-k ids. Both distributions are coarsened to the same ``k + 1`` buckets:
    the ``k`` given ids and one *tail* bucket holding everything else (teacher tail mass ``1 - sum exp(logprobs)``,
    student tail mass ``1 - sum_k q_id``). Any divergence between the coarsened distributions is a proper
    divergence (non-negative, zero when the student matches the teacher's known part and tail mass) and, by the
    data-processing inequality, a lower bound of the full-vocabulary one; it is exact when the teacher's tail is
    empty. Entries whose teacher logprob is ``-inf`` are padding: they drop out of both distributions.

    Args:
        student_logits_at_ids: ``[..., k]`` tempered student logits gathered at the top-k ids.
        student_lse: ``[...]`` logsumexp of the tempered student logits over the whole vocabulary.
        teacher_logprobs: ``[..., k]`` teacher log-probabilities at those ids (used as given).

    Returns:
        ``(log_q [..., k+1], log_p [..., k+1])``, padding entries at :data:`LOG_FLOOR`.
    """
    pad = torch.isneginf(teacher_logprobs)
    log_q_ids = torch.where(pad, LOG_FLOOR, student_logits_at_ids - student_lse.unsqueeze(-1))
    log_p_ids = torch.where(pad, LOG_FLOOR, teacher_logprobs)
    log_q_tail = log1mexp(torch.logsumexp(log_q_ids, dim=-1))
    log_p_tail = log1mexp(torch.logsumexp(log_p_ids, dim=-1))
    log_q = torch.cat([log_q_ids, log_q_tail.unsqueeze(-1)], dim=-1)
    log_p = torch.cat([log_p_ids, log_p_tail.unsqueeze(-1)], dim=-1)
    return log_q, log_p


def topk_kd_per_token(
    student_logits_at_ids: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence against a sparse teacher, :func:`kd_per_token` over the buckets of
    :func:`topk_bucket_log_probs`. Differentiable with respect to the gathered logits and the logsumexp; the
    chunked path and the kernels use exactly that: ``dD/ds_j = dD/dlse * q_j + [j in ids] dD/ds_ids``."""
    log_q, log_p = topk_bucket_log_probs(student_logits_at_ids, student_lse, teacher_logprobs)
    return kd_per_token(log_q, log_p, divergence, beta)


def topk_kd_per_token_and_grad(
    student_logits_at_ids: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D [...], dD/ds_ids [..., k], dD/dlse [...])`` for :func:`topk_kd_per_token`, in closed form.

    With buckets ``c`` (the ids, then the tail), ``G_c = dD/dlog Q_c`` taken with ``log Q`` free (the ``+Q_c``
    terms of the KLs' derivatives cancel because the buckets always sum to one) and the tail's
    ``Gt = G_tail / Q_tail``::

        forward KL: G_c = -P_c                          Gt = -P_tail / Q_tail
        reverse KL: G_c = Q_c (log Q_c - log P_c)       Gt = log Q_tail - log P_tail
        JSD(beta):  G_c = (1-beta) Q_c (log Q_c - log M_c)   Gt = (1-beta) (log Q_tail - log M_tail)

    and, since ``log Q_c = s_c - lse`` and ``log Q_tail = log(1 - sum_c exp(s_c - lse))``:
    ``dD/ds_c = G_c - Q_c Gt``, ``dD/dlse = -sum_c G_c + (1 - Q_tail) Gt``. The full-vocabulary gradient is
    ``dD/ds_j = dD/dlse * q_j + [j in ids] dD/ds_ids`` (``q = softmax(s)``). Autograd is not used (the custom op
    runs below the autograd dispatch key), and the tests check this against autograd of the definition.
    """
    kind = canonical_divergence(divergence, beta)
    log_q, log_p = topk_bucket_log_probs(student_logits_at_ids, student_lse, teacher_logprobs)
    value = kd_per_token(log_q, log_p, kind, beta)
    q = log_q.exp()
    if kind == "forward_kl":
        g = -log_p.exp()
        gt = -(log_p[..., -1] - log_q[..., -1]).exp()
    elif kind == "reverse_kl":
        g = q * (log_q - log_p)
        gt = log_q[..., -1] - log_p[..., -1]
    else:
        log_m = _mixture_log_probs(log_q, log_p, beta)
        g = (1.0 - beta) * q * (log_q - log_m)
        gt = (1.0 - beta) * (log_q[..., -1] - log_m[..., -1])
    g_ids = g[..., :-1] - q[..., :-1] * gt.unsqueeze(-1)
    g_lse = -g[..., :-1].sum(-1) + (1.0 - q[..., -1]) * gt
    return value, g_ids, g_lse
