"""Fused ``lm_head`` + knowledge-distillation loss: ``(1 - alpha) CE + alpha KD`` straight from hidden states.

:func:`fused_linear_kd` never materialises the ``[tokens, vocab]`` logits of the student or the teacher; the
Triton backend walks the vocabulary in tiles with an online fp32 logsumexp, the torch backend works on chunks of
tokens. :func:`fused_linear_kd_reference` is the same math on full logits in plain PyTorch (autograd for the
gradients): readable, importable, and what the tests compare every backend to. The per-token divergences are
defined once, in :mod:`tellneo.ops.divergences`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tellneo._backend import choose_backend, triton_interpreter_enabled
from tellneo.ops import _kd_op  # registers torch.ops.tellneo.fused_linear_kd_*
from tellneo.ops._kd_args import SHARED, KDConfig, KDInputs, check_args, valid_mask
from tellneo.ops.divergences import (
    compute_dtype,
    kd_per_token,
    topk_kd_per_token,
    transform_logits,
)

__all__ = ["KDLossOutput", "fused_linear_kd", "fused_linear_kd_reference", "topk_logprobs"]


class KDLossOutput(NamedTuple):
    """What ``return_parts=True`` returns.

    * ``loss``: the differentiable total ``(1 - alpha) * ce + alpha * kd`` (same value as without return_parts).
    * ``ce``, ``kd``: the two unweighted parts, reduced exactly like ``loss`` (so ``loss == (1-alpha)*ce +
      alpha*kd``), detached, for logging. ``kd`` includes the ``T^2`` factor when ``t2_scale=True``. A part whose
      input is absent (no labels / no teacher) is 0.
    * ``num_tokens``: 0-dim int64 tensor, the number of non-ignored tokens in this call (not
      ``num_items_in_batch``); on the input's device, so reading it does not synchronise until you ``.item()`` it.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: torch.Tensor


_DOC_ARGS = """
    Args:
        student_hidden: ``[N, Hs]`` or ``[..., Hs]`` (leading dims are flattened; ``reduction="none"`` restores
            them), float16 / bfloat16 / float32 / float64. Row ``i`` predicts ``labels[i]``: labels are **already
            aligned** with the hidden rows; the caller does the causal shift (``hidden[:, :-1]`` with
            ``labels[:, 1:]``).
        student_weight: ``[V, Hs]`` student ``lm_head`` weight, same dtype and device as ``student_hidden``.
        teacher_hidden: ``[..., Ht]`` teacher hidden states for the same tokens (``Ht`` may differ from ``Hs``),
            or None. The teacher is frozen: it never receives gradients.
        teacher_weight: ``[Vt, Ht]`` teacher ``lm_head`` weight, ``Vt >= V``, or None. A teacher table with
            **extra rows** (``Vt > V``, vocabularies padded to a multiple of 64/128) is handled by **dropping rows
            ``>= V``** and renormalising the teacher over the shared vocabulary: those ids are padding that no
            tokenizer emits and the student cannot represent, so their (untrained, usually tiny) probability
            carries no knowledge; dropping keeps both distributions on one support, so every divergence stays a
            proper divergence. ``Vt < V`` or a different ``Ht`` between ``teacher_hidden`` and ``teacher_weight``
            raises ValueError.
        labels: ``[...]`` int64/int32 targets with the leading shape of ``student_hidden``, values in ``[0, V)``
            or ``ignore_index``; ignored rows contribute neither CE nor KD. None: every row is a KD token and the
            CE part is 0 (the loss is then ``alpha * KD``).
        student_bias: ``[V]`` or None; gets a gradient when it requires one.
        teacher_bias: ``[Vt]`` or None.
        teacher_topk: ``(ids [..., k], logprobs [..., k])``: a sparse teacher (offline KD) instead of
            ``teacher_hidden``/``teacher_weight``. ``logprobs`` are used as given (compute them at the
            distillation temperature, e.g. with :func:`topk_logprobs`; ``temperature`` still divides the
            *student's* logits). The teacher's missing
            mass ``1 - sum(exp(logprobs))`` and the student's mass outside the ids are compared as one extra
            "tail" bucket: the divergence is taken between the two ``k + 1``-bucket distributions (a proper
            divergence, a lower bound of the full one, exact when the teacher's tail is empty). Entries with
            ``logprobs == -inf`` are padding. Ids must be distinct within a row.
        divergence: ``"forward_kl"`` ``KL(p_teacher || q_student)``, ``"reverse_kl"`` ``KL(q || p)``, or
            ``"jsd"``: generalised JSD with TRL's ``beta`` convention, ``beta * KL(p || m) + (1 - beta) *
            KL(q || m)``, ``m = beta * p + (1 - beta) * q``; ``beta = 0`` is exactly forward KL, ``beta = 1``
            exactly reverse KL (see :mod:`tellneo.ops.divergences`).
        beta: JSD interpolation in ``[0, 1]``; ignored by the KL divergences.
        temperature: ``T > 0`` divides the student and teacher logits of the KD term only (CE is untempered).
        t2_scale: multiply the KD term by ``T**2`` (Hinton et al.) so its gradient scale does not shrink with T.
        alpha: weight of KD in ``[0, 1]``; CE gets ``1 - alpha``. ``alpha = 0`` needs no teacher (CE only).
        ignore_index: label value of ignored rows (shared by CE and KD).
        num_items_in_batch: with ``reduction="mean"``, divide the summed loss by this global count instead of
            this call's number of valid tokens (gradient accumulation / DDP then match one big batch). An int,
            float or scalar tensor (a tensor is never read on the host).
        softcap: ``None`` or ``c > 0``: logits become ``c * tanh(logits / c)`` (Gemma-2 final-logit softcapping),
            applied after ``logit_scale`` and before every softmax (CE and KD); the student's, and the teacher's
            too unless ``teacher_softcap`` says otherwise.
        logit_scale: ``> 0``, multiplies the logits before softcap (Cohere ``logit_scale``; Granite divides by
            ``logits_scaling``, i.e. ``logit_scale = 1 / logits_scaling``); the student's, and the teacher's unless
            ``teacher_logit_scale`` is given.
        teacher_softcap: the teacher's own softcap (``None`` = none), or ``"shared"`` (default): ``softcap``.
        teacher_logit_scale: the teacher's own logit scale, or ``"shared"`` (default): ``logit_scale``. Two
            models of different families (e.g. a Gemma-2 teacher and a Llama student) each get their own transform;
            :func:`tellneo.recipes.head.kd_transform_kwargs` reads them from the models.
        reduction: ``"mean"`` (sum over valid tokens / their count, 0 when there are none), ``"sum"``, or
            ``"none"`` (per-token losses with the leading shape of ``student_hidden``, 0 on ignored rows).
        return_parts: return a :class:`KDLossOutput` (loss, ce, kd, num_tokens) instead of the loss tensor.

    Returns:
        The loss (float32; float64 for float64 inputs): a scalar, or ``[...]`` for ``reduction="none"``; or a
        :class:`KDLossOutput` with ``return_parts=True``.

    Math, per valid token with student logits ``z = transform(h W^T + b)`` (``transform`` = logit_scale then
    softcap) and teacher logits ``u`` likewise (with the teacher's transform): ``CE = logsumexp(z) - z[label]``; ``KD = c * D(softmax(u / T),
    softmax(z / T))`` with ``c = T**2`` if ``t2_scale`` else 1; ``loss_i = (1 - alpha) CE + alpha KD``.

    Errors: a bad shape, dtype, device, vocabulary mismatch or option raises ValueError/TypeError naming the
    argument. Labels or top-k ids out of range raise ValueError for CPU tensors; on CUDA they trigger an
    asynchronous device-side assertion (checking on the host would synchronise). NaN policy: inputs are not
    scanned for NaN/Inf (that would synchronise): non-finite hidden states or weights propagate into the loss
    and the gradients (in ignored rows too, through ``dW``), as with plain PyTorch.
"""


def _reference_impl(inp: KDInputs, cfg: KDConfig, num_items_in_batch: Any, return_parts: bool):
    sh = inp.student_hidden
    cdt = inp.compute_dtype
    n = sh.shape[0]
    valid = valid_mask(inp, cfg)
    z = transform_logits(F.linear(sh, inp.student_weight, inp.student_bias).to(cdt), cfg.logit_scale, cfg.softcap)
    zero = torch.zeros(n, dtype=cdt, device=sh.device)

    ce = zero
    if inp.labels is not None:
        safe = torch.where(valid, inp.labels, 0)
        ce = torch.where(valid, F.cross_entropy(z, safe, reduction="none"), 0.0)

    kd = zero
    if inp.has_teacher:
        s = z / cfg.temperature
        if inp.teacher_weight is not None:
            u = F.linear(inp.teacher_hidden, inp.teacher_weight, inp.teacher_bias).to(cdt)
            t = transform_logits(u, cfg.teacher_logit_scale, cfg.teacher_softcap) / cfg.temperature
            value = kd_per_token(F.log_softmax(s, -1), F.log_softmax(t, -1), cfg.divergence, cfg.beta)
        else:
            value = topk_kd_per_token(
                s.gather(1, inp.topk_ids), torch.logsumexp(s, -1), inp.topk_logprobs.to(cdt), cfg.divergence, cfg.beta
            )
        kd = torch.where(valid, value * cfg.kd_scale, 0.0)

    rows = (1.0 - cfg.alpha) * ce + cfg.alpha * kd
    num_tokens = valid.sum()
    return _reduce(rows, ce, kd, num_tokens, inp, cfg, num_items_in_batch, return_parts)


def _reduce(rows, ce, kd, num_tokens, inp: KDInputs, cfg: KDConfig, num_items_in_batch, return_parts: bool):
    if cfg.reduction == "none":
        loss, ce_r, kd_r = (x.reshape(inp.lead_shape) for x in (rows, ce, kd))
    else:
        scale = _grad_scale(num_tokens, cfg, num_items_in_batch, rows.dtype)
        loss, ce_r, kd_r = rows.sum() * scale, ce.sum() * scale, kd.sum() * scale
    if return_parts:
        return KDLossOutput(loss, ce_r.detach(), kd_r.detach(), num_tokens)
    return loss


def _grad_scale(num_tokens: torch.Tensor, cfg: KDConfig, num_items_in_batch: Any, dtype: torch.dtype) -> torch.Tensor:
    """0-dim tensor multiplying the summed loss: 1 (sum), 1/count (mean), 1/num_items_in_batch. No host sync."""
    dev = num_tokens.device
    if cfg.reduction == "sum" or cfg.reduction == "none":
        return torch.ones((), dtype=dtype, device=dev)
    if num_items_in_batch is None:
        return 1.0 / num_tokens.clamp_min(1).to(dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        return 1.0 / num_items_in_batch.detach().to(device=dev, dtype=dtype).reshape(())
    return torch.full((), 1.0 / float(num_items_in_batch), dtype=dtype, device=dev)


def fused_linear_kd_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    alpha: float = 0.5,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    teacher_softcap: float | None | str = SHARED,
    teacher_logit_scale: float | str = SHARED,
    reduction: str = "mean",
    return_parts: bool = False,
) -> torch.Tensor | KDLossOutput:
    """Full-logits PyTorch reference of :func:`fused_linear_kd` (autograd gradients, ``[N, V]`` memory).

    Same arguments, checks and results as :func:`fused_linear_kd` (without ``backend``); it materialises the
    student's and teacher's ``[N, V]`` logits in the compute dtype (fp32, or fp64 for fp64 inputs), so use it for
    tests and small inputs only. The matmuls run in the inputs' dtype, as ``lm_head`` does.
    """
    inp, cfg = check_args(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_topk=teacher_topk, divergence=divergence,
        beta=beta, temperature=temperature, t2_scale=t2_scale, alpha=alpha, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, softcap=softcap, logit_scale=logit_scale, reduction=reduction,
        teacher_softcap=teacher_softcap, teacher_logit_scale=teacher_logit_scale,
    )
    return _reference_impl(inp, cfg, num_items_in_batch, return_parts)


fused_linear_kd_reference.__doc__ += _DOC_ARGS


def _triton_unavailable(inp: KDInputs) -> str | None:
    sh = inp.student_hidden
    if sh.device.type == "cpu" and not triton_interpreter_enabled():
        return "CPU tensors need TRITON_INTERPRET=1"
    if sh.device.type not in ("cpu", "cuda"):
        return f"device {sh.device.type} is not supported"
    if inp.compute_dtype == torch.float64:
        return "float64 is not supported by the kernels (use backend='torch')"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _choose(inp: KDInputs, backend: str) -> str:
    return choose_backend(
        "fused_linear_kd",
        backend,
        is_cuda=inp.student_hidden.is_cuda,
        available={"triton": lambda: _triton_unavailable(inp), "torch": lambda: None},
        auto_cuda=["triton", "torch"],
        auto_cpu=["torch"],
    )


_TEACHER_FIELDS = ("teacher_hidden", "teacher_weight", "teacher_bias", "topk_logprobs")


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    alpha: float = 0.5,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    teacher_softcap: float | None | str = SHARED,
    teacher_logit_scale: float | str = SHARED,
    reduction: str = "mean",
    return_parts: bool = False,
    backend: str = "auto",
) -> torch.Tensor | KDLossOutput:
    """``(1 - alpha) * CE + alpha * KD`` from hidden states and ``lm_head`` weights, without ``[N, V]`` logits.

    Backends (``backend=`` or ``TELLNEO_BACKEND``): ``"triton"`` (CUDA tensors; CPU tensors when
    ``TRITON_INTERPRET=1``): vocab-tiled kernels, online fp32 logsumexp, the backward recomputes the logit tiles
    from O(N) per-row statistics and accumulates ``dW`` in fp32. ``"torch"``: token chunks of ``[chunk, V]``
    logits; for ``mean``/``sum`` it computes the gradients during the forward (one pass over the logits instead of
    two) and keeps them until the backward, which scales them in place (so backpropagating twice through one call
    with ``retain_graph=True`` raises; use ``reduction="none"`` for that). ``"auto"``: triton for CUDA tensors,
    torch for CPU tensors.

    Half-precision inputs: the torch path and :func:`fused_linear_kd_reference` compute the logits with
    ``F.linear`` in the input dtype, so they are **rounded to bf16/fp16** (as the model's own ``lm_head`` output
    is) before the fp32 softmax; the Triton path keeps the fp32-accumulated logits and does **not** round them.
    The two paths therefore differ by that rounding: measured with bf16 inputs of N = 32 / 64 tokens, H = 64,
    V = 257 / 1000, alpha 0.5, T = 1 (forward KL, reverse KL, JSD), the loss differed by 3e-5 to 1.4e-4
    relative (the KD part alone by up to 3.6e-4), while Triton matched the fp32 reference evaluated on the same
    bf16 values to ~1e-7. fp32 inputs: both paths agree to fp32 rounding. Both stay exact at large logits
    (+-1e4): every log-probability is formed centred on its row's maximum.

    An empty batch (``N = 0``, e.g. a micro-batch or rank without tokens) is allowed: the loss is 0 in every
    reduction and stays connected to the student's weights, so backward gives zero gradients.

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias`` when they require grad (``dW``
    and ``db`` accumulated in fp32, returned in the weight's dtype); teacher inputs get none. The custom ops
    behind it (``torch.ops.tellneo.fused_linear_kd_fwd`` / ``_bwd``) have fake implementations, so
    ``torch.compile`` does not graph-break here, and nothing in forward or backward synchronises with the host
    (labels are range-checked by an asynchronous device assertion on CUDA).

    >>> import torch
    >>> from tellneo.ops import fused_linear_kd
    >>> g = torch.Generator().manual_seed(0)
    >>> hs, ws = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    >>> ht, wt = torch.randn(6, 16, generator=g), torch.randn(11, 16, generator=g)
    >>> labels = torch.tensor([1, 2, -100, 4, 5, 10])
    >>> out = fused_linear_kd(hs, ws, ht, wt, labels, alpha=0.9, return_parts=True)
    >>> bool(torch.isclose(out.loss, 0.1 * out.ce + 0.9 * out.kd)), int(out.num_tokens)
    (True, 5)
    """
    inp, cfg = check_args(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_topk=teacher_topk, divergence=divergence,
        beta=beta, temperature=temperature, t2_scale=t2_scale, alpha=alpha, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, softcap=softcap, logit_scale=logit_scale, reduction=reduction,
        teacher_softcap=teacher_softcap, teacher_logit_scale=teacher_logit_scale,
    )
    chosen = _choose(inp, backend)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and student_hidden.requires_grad
    need_dw = grad_on and student_weight.requires_grad
    need_db = grad_on and student_bias is not None and student_bias.requires_grad
    fused = chosen == "torch" and cfg.reduction != "none" and (need_dh or need_dw or need_db)

    num_tokens = valid_mask(inp, cfg).sum()
    grad_scale = _grad_scale(num_tokens, cfg, num_items_in_batch, inp.compute_dtype)
    frozen = dataclasses.replace(inp, **{name: _detached(getattr(inp, name)) for name in _TEACHER_FIELDS})
    loss, ce, kd, _stats, _dh, _dw, _db = _kd_op.call_fwd(frozen, cfg, grad_scale, chosen, need_dh, need_dw,
                                                         need_db, fused)
    if cfg.reduction == "none":
        loss = ((1.0 - cfg.alpha) * ce + cfg.alpha * kd).reshape(inp.lead_shape)
        ce_r, kd_r = ce.reshape(inp.lead_shape), kd.reshape(inp.lead_shape)
    else:
        ce_r, kd_r = ce.sum() * grad_scale, kd.sum() * grad_scale
    if return_parts:
        return KDLossOutput(loss, ce_r.detach(), kd_r.detach(), num_tokens)
    return loss


fused_linear_kd.__doc__ += _DOC_ARGS


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    vocab_size: int | None = None,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-``k`` log-probabilities, the sparse teacher ``teacher_topk`` of :func:`fused_linear_kd`.

    ``hidden [N, H]`` and ``weight [Vt, H]`` (same dtype and device), ``bias [Vt] | None``: the teacher's
    ``lm_head``; its logits ``transform(hidden W^T + b)`` (``logit_scale`` then ``softcap``, as in
    :func:`fused_linear_kd`) are divided by ``temperature`` and log-softmaxed in the compute dtype (float32;
    float64 for float64 inputs). ``vocab_size``: keep only the first ``vocab_size`` ids (a teacher head padded
    beyond the student's vocabulary), renormalised there, exactly as :func:`fused_linear_kd` treats a padded
    dense teacher. Rows are processed ``chunk_rows`` at a time (``[chunk_rows, V]`` logits at most).

    Returns ``(ids [N, k] int64, logprobs [N, k])``, sorted by decreasing log-probability.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"topk_logprobs: hidden must be a [N, H] tensor, got {getattr(hidden, 'shape', hidden)!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"topk_logprobs: weight must be [V, H={hidden.shape[1]}], got "
                         f"{getattr(weight, 'shape', weight)!r}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"topk_logprobs: weight dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    if not 0 < k <= weight.shape[0]:
        raise ValueError(f"topk_logprobs: k must be in [1, {weight.shape[0]}] (the vocabulary), got {k}")
    if not temperature > 0:
        raise ValueError(f"topk_logprobs: temperature must be > 0, got {temperature}")
    cdt = compute_dtype(hidden.dtype)
    ids = torch.empty(hidden.shape[0], k, dtype=torch.int64, device=hidden.device)
    lps = torch.empty(hidden.shape[0], k, dtype=cdt, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk_rows):
        logits = transform_logits(F.linear(hidden[a : a + chunk_rows], weight, bias).to(cdt), logit_scale, softcap)
        top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)  # sorted, largest first
        ids[a : a + chunk_rows], lps[a : a + chunk_rows] = top.indices, top.values
    return ids, lps
