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

The ops' argument lists are declared once, by the fields of :class:`~tellneo.ops._kd_args.KDInputs` (the
tensors) and :class:`~tellneo.ops._kd_args.KDConfig` (the scalars) plus the few per-op extras in
:data:`FWD_ARGS` / :data:`BWD_ARGS`; the schema strings, the packing of a call (:func:`call_fwd`) and its
unpacking (in the implementations, the fakes and the autograd formula) are all derived from those tuples.

The autograd formula of the forward op scales the precomputed gradients by the incoming scalar (fused mode) or
calls the backward op with per-row weights built from the incoming gradients (recompute mode).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from tellneo.ops import _kd_torch
from tellneo.ops._kd_args import KDConfig, KDInputs, hidden_dtypes, valid_mask
from tellneo.ops.divergences import compute_dtype

_EMPTY_SHAPE = (0,)
# annotation of a KDInputs / KDConfig field (strings: ``from __future__ import annotations``) -> schema type
_SCHEMA_TYPES = {"torch.Tensor": "Tensor", "torch.Tensor | None": "Tensor?", "str": "str", "float": "float",
                 "float | None": "float?", "int": "int"}


def _fields(cls: type, skip: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, _SCHEMA_TYPES[f.type]) for f in dataclasses.fields(cls) if f.name not in skip)


#: ``(name, schema type)`` of the tensors and the scalars of one call, as the two dataclasses declare them. The
#: ops see flattened ``[N, ...]`` rows and return per-row values, so the caller's ``lead_shape`` and
#: ``reduction`` stay with the caller.
INPUT_ARGS = _fields(KDInputs, skip=("lead_shape",))
CONFIG_ARGS = _fields(KDConfig, skip=("reduction",))
_RUN_ARGS = (("backend", "str"), ("need_dh", "bool"), ("need_dw", "bool"), ("need_db", "bool"))
FWD_ARGS = INPUT_ARGS + (("grad_scale", "Tensor"),) + CONFIG_ARGS + _RUN_ARGS + (("fused_grad", "bool"),)
BWD_ARGS = (("w_ce", "Tensor?"), ("w_kd", "Tensor?")) + INPUT_ARGS + (("stats", "Tensor"),) + CONFIG_ARGS + _RUN_ARGS
_NUM_FWD_OUT, _NUM_BWD_OUT = 7, 3


def _schema(args: tuple[tuple[str, str], ...], n_out: int) -> str:
    return f"({', '.join(f'{t} {n}' for n, t in args)}) -> ({', '.join(['Tensor'] * n_out)})"


def _named(decl: tuple[tuple[str, str], ...], values: tuple) -> dict[str, Any]:
    return {name: v for (name, _), v in zip(decl, values, strict=True)}


def _unpack(a: dict[str, Any]) -> tuple[KDInputs, KDConfig]:
    inp = KDInputs(**{n: a[n] for n, _ in INPUT_ARGS}, lead_shape=(a["student_hidden"].shape[0],))
    return inp, KDConfig(**{n: a[n] for n, _ in CONFIG_ARGS}, reduction="mean")


def _pack(inp: KDInputs, cfg: KDConfig) -> tuple[list, list]:
    return [getattr(inp, n) for n, _ in INPUT_ARGS], [getattr(cfg, n) for n, _ in CONFIG_ARGS]


def call_fwd(inp: KDInputs, cfg: KDConfig, grad_scale: Tensor, backend: str, need_dh: bool, need_dw: bool,
             need_db: bool, fused_grad: bool) -> tuple[Tensor, ...]:
    """``torch.ops.tellneo.fused_linear_kd_fwd`` on one call's inputs and configuration."""
    tensors, scalars = _pack(inp, cfg)
    return torch.ops.tellneo.fused_linear_kd_fwd(*tensors, grad_scale, *scalars, backend, need_dh, need_dw, need_db,
                                                 fused_grad)


def _num_stats(backend: str) -> int:
    """Width of the per-row statistics a backend's forward hands to its own backward."""
    if backend == "triton":
        from tellneo.ops import _kd_triton

        return _kd_triton.num_row_stats()
    return _kd_torch.NUM_STATS


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE)


def _grads_or_empty(sh: Tensor, sw: Tensor, dh, dw, db) -> tuple[Tensor, Tensor, Tensor]:
    return (
        dh if dh is not None else _empty(sh),
        dw if dw is not None else _empty(sw),
        db if db is not None else _empty(sw),
    )


@torch.library.custom_op("tellneo::fused_linear_kd_fwd", mutates_args=(), schema=_schema(FWD_ARGS, _NUM_FWD_OUT))
def fused_linear_kd_fwd(*args: Any) -> tuple[Tensor, ...]:
    a = _named(FWD_ARGS, args)
    inp, cfg = _unpack(a)
    backend, grad_scale, fused_grad = a["backend"], a["grad_scale"], a["fused_grad"]
    valid = valid_mask(inp, cfg)
    if backend == "triton":
        from tellneo.ops import _kd_triton

        ce, kd, stats = _kd_triton.forward(inp, cfg)
        dh = dw = db = None
        if fused_grad:
            raise RuntimeError("fused_linear_kd: fused_grad is a torch-backend mode")
    elif backend == "torch":
        ce, kd, stats, (dh, dw, db) = _kd_torch.forward(
            inp, cfg, grad_scale=grad_scale if fused_grad else None,
            need_dh=a["need_dh"], need_dw=a["need_dw"], need_db=a["need_db"],
        )
    else:
        raise ValueError(f"fused_linear_kd: unknown backend {backend!r}")
    gs = grad_scale.to(ce.dtype).reshape(())
    loss = torch.where(valid, (1.0 - cfg.alpha) * ce + cfg.alpha * kd, 0.0).sum() * gs
    return (loss, ce, kd, stats, *_grads_or_empty(inp.student_hidden, inp.student_weight, dh, dw, db))


@fused_linear_kd_fwd.register_fake
def _fwd_fake(*args: Any) -> tuple[Tensor, ...]:
    a = _named(FWD_ARGS, args)
    sh, sw = a["student_hidden"], a["student_weight"]
    n, v = sh.shape[0], sw.shape[0]
    cdt = compute_dtype(*hidden_dtypes(sh, a["teacher_hidden"]))
    fused = a["fused_grad"]
    return (
        sh.new_empty((), dtype=cdt),
        sh.new_empty((n,), dtype=cdt),
        sh.new_empty((n,), dtype=cdt),
        sh.new_empty((n, _num_stats(a["backend"])), dtype=cdt),
        sh.new_empty(sh.shape) if fused and a["need_dh"] else _empty(sh),
        sw.new_empty(sw.shape) if fused and a["need_dw"] else _empty(sw),
        sw.new_empty((v,)) if fused and a["need_db"] else _empty(sw),
    )


@torch.library.custom_op("tellneo::fused_linear_kd_bwd", mutates_args=(), schema=_schema(BWD_ARGS, _NUM_BWD_OUT))
def fused_linear_kd_bwd(*args: Any) -> tuple[Tensor, ...]:
    a = _named(BWD_ARGS, args)
    inp, cfg = _unpack(a)
    backend, need = a["backend"], dict(need_dh=a["need_dh"], need_dw=a["need_dw"], need_db=a["need_db"])
    if backend == "triton":
        from tellneo.ops import _kd_triton

        dh, dw, db = _kd_triton.backward(inp, cfg, a["stats"], a["w_ce"], a["w_kd"], **need)
    elif backend == "torch":
        dh, dw, db = _kd_torch.backward(inp, cfg, a["w_ce"], a["w_kd"], **need)
    else:
        raise ValueError(f"fused_linear_kd: unknown backend {backend!r}")
    return _grads_or_empty(inp.student_hidden, inp.student_weight, dh, dw, db)


@fused_linear_kd_bwd.register_fake
def _bwd_fake(*args: Any) -> tuple[Tensor, ...]:
    a = _named(BWD_ARGS, args)
    sh, sw = a["student_hidden"], a["student_weight"]
    return (
        sh.new_empty(sh.shape) if a["need_dh"] else _empty(sh),
        sw.new_empty(sw.shape) if a["need_dw"] else _empty(sw),
        sw.new_empty((sw.shape[0],)) if a["need_db"] else _empty(sw),
    )


_FWD_TENSORS = tuple(n for n, t in FWD_ARGS if t.startswith("Tensor"))
_FWD_SCALARS = tuple(n for n, t in FWD_ARGS if not t.startswith("Tensor"))


def _setup_context(ctx, inputs, output) -> None:
    args = _named(FWD_ARGS, inputs)
    _, _, _, stats, dh, dw, db = output
    ctx.scalars = {k: args[k] for k in _FWD_SCALARS}
    ctx.present = [args[k] is not None for k in _FWD_TENSORS]
    ctx.save_for_backward(*[args[k] for k in _FWD_TENSORS if args[k] is not None], stats, dh, dw, db)
    ctx.mark_non_differentiable(stats, dh, dw, db)
    # no zeros_like() for the unused outputs' gradients: for dw that would be a transient [V, Hs] tensor
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_ce, g_kd, g_stats, g_dh, g_dw, g_db):
    saved = list(ctx.saved_tensors)
    stats, dh, dw, db = saved[-4:]
    it = iter(saved[:-4])
    a = {k: (next(it) if present else None) for k, present in zip(_FWD_TENSORS, ctx.present)}
    a.update(ctx.scalars)
    need = (a["need_dh"], a["need_dw"], a["need_db"])
    grads_in: dict[str, Tensor | None] = dict.fromkeys(n for n, _ in FWD_ARGS)
    if a["fused_grad"]:
        if g_loss is None:
            return tuple(grads_in.values())
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
        alpha, gs = a["alpha"], a["grad_scale"].reshape(())
        w_ce = g_ce
        w_kd = g_kd
        if g_loss is not None:
            gl = (g_loss.reshape(()) * gs).to(stats.dtype).expand(stats.shape[0])
            w_ce = gl * (1.0 - alpha) if w_ce is None else w_ce + gl * (1.0 - alpha)
            w_kd = gl * alpha if w_kd is None else w_kd + gl * alpha
        a.update(w_ce=w_ce, w_kd=w_kd, stats=stats)
        out = torch.ops.tellneo.fused_linear_kd_bwd(*(a[n] for n, _ in BWD_ARGS))
        grads = [x if n else None for x, n in zip(out, need)]
    grads_in["student_hidden"], grads_in["student_weight"] = grads[0], grads[1]
    grads_in["student_bias"] = grads[2] if a["student_bias"] is not None else None
    return tuple(grads_in.values())


fused_linear_kd_fwd.register_autograd(_backward, setup_context=_setup_context)
