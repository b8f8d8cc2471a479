"""``torch.library`` custom ops behind :func:`tellneo.ops.fused_linear_kd`.

Two ops, both with fake (meta) implementations so ``torch.compile`` traces through them without a graph break:

``tellneo::fused_linear_kd_fwd`` -> ``(loss, ce_rows, kd_rows, stats, dh, dw, db)``
    ``loss = grad_scale * sum_i valid_i [(1 - alpha) ce_i + alpha kd_i]`` (0-dim), per-row CE and KD (``[N]``, 0 on
    ignored rows, KD already multiplied by ``kd_scale``), per-row statistics for the same backend's backward
    (``[N, 4]`` torch, ``[N, 7]`` Triton: see each backend's module), and,
    with ``fused_grad=True``, the gradients of ``loss`` (``dh [N, Hs]``, ``dw [V, Hs]``, ``db [V]``; empty
    ``[0]`` tensors for the ones not asked for). Compute dtype float32 (float64 for float64 inputs).
``tellneo::fused_linear_kd_bwd`` -> ``(dh, dw, db)``
    gradients of ``sum_i valid_i (w_ce_i ce_i + w_kd_i kd_i)``, recomputing the logits tile by tile (Triton) or
    chunk by chunk (torch).

The autograd formula of the forward op scales the precomputed gradients by the incoming scalar (fused mode) or
calls the backward op with per-row weights built from the incoming gradients (recompute mode).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tellneo.ops import _kd_torch
from tellneo.ops._kd_args import KDConfig, KDInputs

_EMPTY_SHAPE = (0,)


def _inputs(sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp) -> KDInputs:
    return KDInputs(sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp, lead_shape=(sh.shape[0],))


def _config(divergence, beta, temperature, kd_scale, alpha, ignore_index, softcap, logit_scale, t_softcap,
            t_logit_scale) -> KDConfig:
    return KDConfig(divergence, beta, temperature, kd_scale, alpha, ignore_index, softcap, logit_scale, "mean",
                    t_softcap, t_logit_scale)


def _cdtype(sh: Tensor, th: Optional[Tensor]) -> torch.dtype:
    if sh.dtype == torch.float64 or (th is not None and th.dtype == torch.float64):
        return torch.float64
    return torch.float32


def _num_stats(backend: str) -> int:
    """Width of the per-row statistics a backend's forward hands to its own backward."""
    if backend == "triton":
        from tellneo.kernels.fused_linear_kd import NUM_ROW_STATS

        return NUM_ROW_STATS
    return _kd_torch.NUM_STATS


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE)


@torch.library.custom_op("tellneo::fused_linear_kd_fwd", mutates_args=())
def fused_linear_kd_fwd(
    sh: Tensor,
    sw: Tensor,
    sb: Optional[Tensor],
    th: Optional[Tensor],
    tw: Optional[Tensor],
    tb: Optional[Tensor],
    labels: Optional[Tensor],
    topk_ids: Optional[Tensor],
    topk_lp: Optional[Tensor],
    grad_scale: Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    kd_scale: float,
    alpha: float,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    t_softcap: Optional[float],
    t_logit_scale: float,
    backend: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    fused_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    inp = _inputs(sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp)
    cfg = _config(divergence, beta, temperature, kd_scale, alpha, ignore_index, softcap, logit_scale, t_softcap,
                  t_logit_scale)
    valid = _kd_torch.valid_mask(inp, cfg)
    if backend == "triton":
        from tellneo.kernels.fused_linear_kd import triton_forward

        ce, kd, stats = triton_forward(inp, cfg)
        dh = dw = db = None
        if fused_grad:
            raise RuntimeError("fused_linear_kd: fused_grad is a torch-backend mode")
    elif backend == "torch":
        ce, kd, stats, (dh, dw, db) = _kd_torch.forward(
            inp, cfg, grad_scale=grad_scale if fused_grad else None,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db,
        )
    else:
        raise ValueError(f"fused_linear_kd: unknown backend {backend!r}")
    gs = grad_scale.to(ce.dtype).reshape(())
    loss = torch.where(valid, (1.0 - alpha) * ce + alpha * kd, 0.0).sum() * gs
    return (
        loss,
        ce,
        kd,
        stats,
        dh if dh is not None else _empty(sh),
        dw if dw is not None else _empty(sw),
        db if db is not None else _empty(sw),
    )


@fused_linear_kd_fwd.register_fake
def _fwd_fake(sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp, grad_scale, divergence, beta, temperature,
              kd_scale, alpha, ignore_index, softcap, logit_scale, t_softcap, t_logit_scale, backend, need_dh,
              need_dw, need_db, fused_grad):
    n, v = sh.shape[0], sw.shape[0]
    cdt = _cdtype(sh, th)
    fused = fused_grad
    return (
        sh.new_empty((), dtype=cdt),
        sh.new_empty((n,), dtype=cdt),
        sh.new_empty((n,), dtype=cdt),
        sh.new_empty((n, _num_stats(backend)), dtype=cdt),
        sh.new_empty(sh.shape) if fused and need_dh else _empty(sh),
        sw.new_empty(sw.shape) if fused and need_dw else _empty(sw),
        sw.new_empty((v,)) if fused and need_db else _empty(sw),
    )


@torch.library.custom_op("tellneo::fused_linear_kd_bwd", mutates_args=())
def fused_linear_kd_bwd(
    w_ce: Optional[Tensor],
    w_kd: Optional[Tensor],
    sh: Tensor,
    sw: Tensor,
    sb: Optional[Tensor],
    th: Optional[Tensor],
    tw: Optional[Tensor],
    tb: Optional[Tensor],
    labels: Optional[Tensor],
    topk_ids: Optional[Tensor],
    topk_lp: Optional[Tensor],
    stats: Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    kd_scale: float,
    alpha: float,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    t_softcap: Optional[float],
    t_logit_scale: float,
    backend: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    inp = _inputs(sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp)
    cfg = _config(divergence, beta, temperature, kd_scale, alpha, ignore_index, softcap, logit_scale, t_softcap,
                  t_logit_scale)
    if backend == "triton":
        from tellneo.kernels.fused_linear_kd import triton_backward

        dh, dw, db = triton_backward(inp, cfg, stats, w_ce, w_kd, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    elif backend == "torch":
        dh, dw, db = _kd_torch.backward(inp, cfg, w_ce, w_kd, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    else:
        raise ValueError(f"fused_linear_kd: unknown backend {backend!r}")
    return (
        dh if dh is not None else _empty(sh),
        dw if dw is not None else _empty(sw),
        db if db is not None else _empty(sw),
    )


@fused_linear_kd_bwd.register_fake
def _bwd_fake(w_ce, w_kd, sh, sw, sb, th, tw, tb, labels, topk_ids, topk_lp, stats, divergence, beta, temperature,
              kd_scale, alpha, ignore_index, softcap, logit_scale, t_softcap, t_logit_scale, backend, need_dh,
              need_dw, need_db):
    return (
        sh.new_empty(sh.shape) if need_dh else _empty(sh),
        sw.new_empty(sw.shape) if need_dw else _empty(sw),
        sw.new_empty((sw.shape[0],)) if need_db else _empty(sw),
    )


_TENSOR_ARGS = ("sh", "sw", "sb", "th", "tw", "tb", "labels", "topk_ids", "topk_lp", "grad_scale")
_SCALAR_ARGS = ("divergence", "beta", "temperature", "kd_scale", "alpha", "ignore_index", "softcap", "logit_scale",
                "t_softcap", "t_logit_scale", "backend", "need_dh", "need_dw", "need_db", "fused_grad")


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_TENSOR_ARGS + _SCALAR_ARGS, inputs))
    _, _, _, stats, dh, dw, db = output
    ctx.scalars = {k: args[k] for k in _SCALAR_ARGS}
    ctx.present = [args[k] is not None for k in _TENSOR_ARGS]
    ctx.save_for_backward(*[args[k] for k in _TENSOR_ARGS if args[k] is not None], stats, dh, dw, db)
    ctx.mark_non_differentiable(stats, dh, dw, db)
    # no zeros_like() for the unused outputs' gradients: for dw that would be a transient [V, Hs] tensor
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_ce, g_kd, g_stats, g_dh, g_dw, g_db):
    saved = list(ctx.saved_tensors)
    stats, dh, dw, db = saved[-4:]
    it = iter(saved[:-4])
    t = {k: (next(it) if present else None) for k, present in zip(_TENSOR_ARGS, ctx.present)}
    sc = ctx.scalars
    need = (sc["need_dh"], sc["need_dw"], sc["need_db"])
    if sc["fused_grad"]:
        if g_loss is None:
            return (None,) * (len(_TENSOR_ARGS) + len(_SCALAR_ARGS))
        g = g_loss.reshape(())
        # Eager: scale the saved gradients in place instead of allocating a second [V, Hs] dW; the in-place update
        # bumps their version counters, so a second backward through a retained graph fails with autograd's
        # "modified by an inplace operation" error instead of silently using scaled values. Traced (AOT /
        # torch.compile, where saved tensors are functional wrappers): out of place.
        eager = type(dw if need[1] else dh if need[0] else db) is torch.Tensor and not torch.compiler.is_compiling()
        # .detach(): a new handle on the same storage (and version counter) that autograd's AccumulateGrad can adopt
        # as .grad without cloning, which it would do for the saved tensor itself (still referenced by the graph).
        grads = [(x.mul_(g.to(x.dtype)).detach() if eager else x * g.to(x.dtype)) if n else None
                 for x, n in zip((dh, dw, db), need)]
    else:
        alpha, gs = sc["alpha"], t["grad_scale"].reshape(())
        w_ce = g_ce
        w_kd = g_kd
        if g_loss is not None:
            gl = (g_loss.reshape(()) * gs).to(stats.dtype).expand(stats.shape[0])
            w_ce = gl * (1.0 - alpha) if w_ce is None else w_ce + gl * (1.0 - alpha)
            w_kd = gl * alpha if w_kd is None else w_kd + gl * alpha
        out = torch.ops.tellneo.fused_linear_kd_bwd(
            w_ce, w_kd, t["sh"], t["sw"], t["sb"], t["th"], t["tw"], t["tb"], t["labels"], t["topk_ids"],
            t["topk_lp"], stats, sc["divergence"], sc["beta"], sc["temperature"], sc["kd_scale"], alpha,
            sc["ignore_index"], sc["softcap"], sc["logit_scale"], sc["t_softcap"], sc["t_logit_scale"], sc["backend"],
            *need,
        )
        grads = [x if n else None for x, n in zip(out, need)]
    dh_, dw_, db_ = grads
    return (dh_, dw_, db_ if t["sb"] is not None else None) + (None,) * (len(_TENSOR_ARGS) - 3 + len(_SCALAR_ARGS))


fused_linear_kd_fwd.register_autograd(_backward, setup_context=_setup_context)
