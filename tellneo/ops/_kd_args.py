"""Argument checking and normalisation for :func:`tellneo.ops.fused_linear_kd` (shared by every path, so the
reference and the fused op reject exactly the same inputs with the same messages), the two dataclasses that
carry one call (:class:`KDInputs`, :class:`KDConfig`: also the declaration of the custom ops' arguments) and the
rules every path shares: the valid-token mask (:func:`valid_mask`) and the compute dtype
(:attr:`KDInputs.compute_dtype`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tellneo.ops.divergences import DIVERGENCES, canonical_divergence, compute_dtype

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)
_OP = "fused_linear_kd"
#: Default of ``teacher_softcap`` / ``teacher_logit_scale``: the teacher uses the shared ``softcap`` / ``logit_scale``.
SHARED = "shared"


@dataclass(frozen=True)
class KDConfig:
    """Scalar configuration of one call, after validation (hashable). Its fields but ``reduction`` (which stays
    with the caller) are, in this order and with these types, the scalar arguments of the custom ops:
    :mod:`tellneo.ops._kd_op` derives their schemas from this declaration."""

    divergence: str  # canonical: jsd at beta 0/1 already mapped to forward/reverse KL
    beta: float
    temperature: float
    kd_scale: float  # T^2 if t2_scale else 1
    alpha: float
    ignore_index: int
    softcap: float | None  # the student's (and, unless teacher_softcap is given, the teacher's)
    logit_scale: float
    reduction: str
    teacher_softcap: float | None  # the teacher's own transform (resolved: equal to the shared one by default)
    teacher_logit_scale: float


@dataclass
class KDInputs:
    """Flattened tensors of one call: every per-token tensor is ``[N, ...]``; ``lead_shape`` restores the caller's
    leading dims for ``reduction="none"``. The other fields are, in this order, the custom ops' tensor arguments
    (see :class:`KDConfig`)."""

    student_hidden: torch.Tensor  # [N, Hs]
    student_weight: torch.Tensor  # [V, Hs]
    student_bias: torch.Tensor | None  # [V]
    teacher_hidden: torch.Tensor | None  # [N, Ht]
    teacher_weight: torch.Tensor | None  # [V, Ht]: rows >= V of a padded teacher table already dropped
    teacher_bias: torch.Tensor | None  # [V]
    labels: torch.Tensor | None  # [N] int64
    topk_ids: torch.Tensor | None  # [N, k] int64
    topk_logprobs: torch.Tensor | None  # [N, k] float
    lead_shape: tuple[int, ...]

    @property
    def has_teacher(self) -> bool:
        return self.teacher_weight is not None or self.topk_ids is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 if the student's or the dense teacher's hidden states are float64, else float32."""
        return compute_dtype(*hidden_dtypes(self.student_hidden, self.teacher_hidden))


def hidden_dtypes(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None) -> tuple[torch.dtype, ...]:
    """The dtypes that decide the compute dtype (:func:`tellneo.ops.divergences.compute_dtype`)."""
    return (student_hidden.dtype,) if teacher_hidden is None else (student_hidden.dtype, teacher_hidden.dtype)


def valid_mask(inp: KDInputs, cfg: KDConfig) -> torch.Tensor:
    """``[N]`` bool: the rows that count (label != ignore_index; every row without labels)."""
    if inp.labels is None:
        return torch.ones(inp.student_hidden.shape[0], dtype=torch.bool, device=inp.student_hidden.device)
    return inp.labels != cfg.ignore_index


def _fail(name: str, message: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{_OP}: {name} {message}")


def _check_tensor(name: str, t: Any, *, float_dtype: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    allowed = _FLOAT_DTYPES if float_dtype else _INDEX_DTYPES
    if t.dtype not in allowed:
        kinds = "a floating dtype (float16, bfloat16, float32, float64)" if float_dtype else "int64 or int32"
        _fail(name, f"must have {kinds}, got {t.dtype}", TypeError)
    return t


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail(name, f"is on {t.device} but student_hidden is on {ref.device}")


def _check_index_range(name: str, idx: torch.Tensor, upper: int, allowed_extra: int | None, what: str) -> None:
    """Values in [0, upper) (or == allowed_extra). Exact ValueError on CPU; an asynchronous device assertion on
    other devices and under torch.compile, so no host synchronisation happens there."""
    bad = (idx < 0) | (idx >= upper)
    if allowed_extra is not None:
        bad = bad & (idx != allowed_extra)
    msg = f"{_OP}: {name} must be in [0, {upper}) ({what})"
    if allowed_extra is not None:
        msg += f" or equal ignore_index={allowed_extra}"
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            first = idx[bad][0].item()
            raise ValueError(f"{msg}; got {first}")
    else:
        torch._assert_async(~bad.any(), msg)


def _check_softcap(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, f"must be None or a finite number > 0, got {value!r}", TypeError)
    if value <= 0:
        _fail(name, f"must be None or > 0, got {value}")


def _check_student(student_hidden: Any, student_weight: Any, student_bias: Any
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``student_hidden [..., Hs]``, ``student_weight [V, Hs]`` (same dtype and device, ``V > 0``), ``student_bias
    [V] | None``."""
    sh = _check_tensor("student_hidden", student_hidden, float_dtype=True)
    if sh.dim() < 2:
        _fail("student_hidden", f"must be [N, Hs] or [..., Hs], got shape {tuple(sh.shape)}")
    hs = sh.shape[-1]
    sw = _check_tensor("student_weight", student_weight, float_dtype=True)
    if sw.dim() != 2 or sw.shape[1] != hs:
        _fail("student_weight", f"must be [V, Hs={hs}], got shape {tuple(sw.shape)}")
    if sw.dtype != sh.dtype:
        _fail("student_weight", f"dtype {sw.dtype} differs from student_hidden's {sh.dtype}", TypeError)
    _same_device("student_weight", sw, sh)
    vocab = sw.shape[0]
    if vocab == 0:
        _fail("student_weight", "has an empty vocabulary (V = 0)")
    sb = None
    if student_bias is not None:
        sb = _check_tensor("student_bias", student_bias, float_dtype=True)
        if tuple(sb.shape) != (vocab,):
            _fail("student_bias", f"must be [V={vocab}], got shape {tuple(sb.shape)}")
        if sb.dtype != sw.dtype:
            _fail("student_bias", f"dtype {sb.dtype} differs from student_weight's {sw.dtype}", TypeError)
        _same_device("student_bias", sb, sh)
    return sh, sw, sb


def _check_scalars(
    *, divergence: Any, beta: Any, temperature: Any, t2_scale: Any, alpha: Any, ignore_index: Any,
    num_items_in_batch: Any, softcap: Any, logit_scale: Any, reduction: Any, teacher_softcap: Any,
    teacher_logit_scale: Any,
) -> tuple[Any, Any]:
    """Every scalar option; returns ``(teacher_softcap, teacher_logit_scale)`` with :data:`SHARED` resolved."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        _fail("divergence", f"must be one of {DIVERGENCES}, got {divergence!r}")
    for name, val in (("beta", beta), ("alpha", alpha), ("temperature", temperature), ("logit_scale", logit_scale)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            _fail(name, f"must be a finite Python number, got {val!r}", TypeError)
    if not 0.0 <= beta <= 1.0:
        _fail("beta", f"must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        _fail("alpha", f"must be in [0, 1] (weight of the KD term; CE gets 1 - alpha), got {alpha}")
    if temperature <= 0:
        _fail("temperature", f"must be > 0, got {temperature}")
    if logit_scale <= 0:
        _fail("logit_scale", f"must be > 0, got {logit_scale}")
    _check_softcap("softcap", softcap)
    if isinstance(teacher_logit_scale, str) and teacher_logit_scale == SHARED:
        teacher_logit_scale = logit_scale
    elif isinstance(teacher_logit_scale, bool) or not isinstance(teacher_logit_scale, (int, float)) or \
            not math.isfinite(teacher_logit_scale):
        _fail("teacher_logit_scale", f"must be 'shared' or a finite Python number, got {teacher_logit_scale!r}",
              TypeError)
    elif teacher_logit_scale <= 0:
        _fail("teacher_logit_scale", f"must be > 0, got {teacher_logit_scale}")
    if isinstance(teacher_softcap, str) and teacher_softcap == SHARED:
        teacher_softcap = softcap
    else:
        _check_softcap("teacher_softcap", teacher_softcap)
    if not isinstance(t2_scale, bool):
        _fail("t2_scale", f"must be a bool, got {t2_scale!r}", TypeError)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail("ignore_index", f"must be an int, got {ignore_index!r}", TypeError)
    if reduction not in REDUCTIONS:
        _fail("reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            _fail("num_items_in_batch", f"replaces the token count of reduction='mean'; got reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                _fail("num_items_in_batch", f"must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            _fail("num_items_in_batch", f"must be None, a number or a scalar tensor, got {num_items_in_batch!r}",
                  TypeError)
        elif not num_items_in_batch > 0:
            _fail("num_items_in_batch", f"must be > 0, got {num_items_in_batch}")
    return teacher_softcap, teacher_logit_scale


def _check_labels(labels: Any, sh: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor | None:
    """``labels`` with the leading shape of ``sh``, flattened to ``[N]`` int64, values in ``[0, V)`` or
    ``ignore_index``."""
    if labels is None:
        return None
    lead = tuple(sh.shape[:-1])
    lab = _check_tensor("labels", labels, float_dtype=False)
    if tuple(lab.shape) != lead:
        _fail("labels", f"must have the leading shape of student_hidden {lead}, got {tuple(lab.shape)}")
    _same_device("labels", lab, sh)
    lab = lab.reshape(-1).long()
    _check_index_range("labels", lab, vocab, ignore_index, "the student vocabulary")
    return lab


def _check_dense_teacher(teacher_hidden: Any, teacher_weight: Any, teacher_bias: Any, sh: torch.Tensor, vocab: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``teacher_hidden [..., Ht]`` (rows flattened), ``teacher_weight [Vt >= V, Ht]`` and ``teacher_bias [Vt]``,
    rows ``>= V`` of a padded teacher dropped."""
    lead = tuple(sh.shape[:-1])
    if teacher_hidden is None or teacher_weight is None:
        missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
        _fail(missing, "is None but the other dense-teacher tensor was given; give both or neither")
    th = _check_tensor("teacher_hidden", teacher_hidden, float_dtype=True)
    if tuple(th.shape[:-1]) != lead or th.dim() < 2:
        _fail("teacher_hidden", f"must be [..., Ht] with leading shape {lead}, got {tuple(th.shape)}")
    _same_device("teacher_hidden", th, sh)
    tw = _check_tensor("teacher_weight", teacher_weight, float_dtype=True)
    if tw.dim() != 2 or tw.shape[1] != th.shape[-1]:
        _fail("teacher_weight", f"must be [Vt, Ht={th.shape[-1]}], got shape {tuple(tw.shape)}")
    if tw.dtype != th.dtype:
        _fail("teacher_weight", f"dtype {tw.dtype} differs from teacher_hidden's {th.dtype}", TypeError)
    _same_device("teacher_weight", tw, sh)
    if tw.shape[0] < vocab:
        _fail("teacher_weight", f"has vocabulary {tw.shape[0]} smaller than the student's {vocab}: the "
              "vocabularies must match (a teacher may only have extra padded rows at the end)")
    tb = None
    if teacher_bias is not None:
        tb = _check_tensor("teacher_bias", teacher_bias, float_dtype=True)
        if tuple(tb.shape) != (tw.shape[0],):
            _fail("teacher_bias", f"must be [Vt={tw.shape[0]}], got shape {tuple(tb.shape)}")
        if tb.dtype != tw.dtype:
            _fail("teacher_bias", f"dtype {tb.dtype} differs from teacher_weight's {tw.dtype}", TypeError)
        _same_device("teacher_bias", tb, sh)
        tb = tb[:vocab]
    # Padded teacher tables (Vt > V): rows >= V are ids no tokenizer emits. They are dropped and the teacher
    # is renormalised over the shared vocabulary (see fused_linear_kd's docstring for why).
    return th.reshape(-1, th.shape[-1]), tw[:vocab], tb


def _check_topk_teacher(teacher_topk: Any, sh: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [..., k], logprobs [..., k])`` flattened to ``[N, k]`` (ids int64, in ``[0, V)``)."""
    lead = tuple(sh.shape[:-1])
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        _fail("teacher_topk", "must be a pair (ids [..., k], logprobs [..., k])", TypeError)
    ids = _check_tensor("teacher_topk[0] (ids)", teacher_topk[0], float_dtype=False)
    lps = _check_tensor("teacher_topk[1] (logprobs)", teacher_topk[1], float_dtype=True)
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        _fail("teacher_topk[0] (ids)", f"must be [..., k] with leading shape {lead} and k >= 1, "
              f"got {tuple(ids.shape)}")
    if lps.shape != ids.shape:
        _fail("teacher_topk[1] (logprobs)", f"must have the shape of the ids {tuple(ids.shape)}, "
              f"got {tuple(lps.shape)}")
    if ids.shape[-1] > vocab:
        _fail("teacher_topk[0] (ids)", f"has k={ids.shape[-1]} > vocabulary size {vocab}")
    _same_device("teacher_topk[0] (ids)", ids, sh)
    _same_device("teacher_topk[1] (logprobs)", lps, sh)
    ids = ids.reshape(-1, ids.shape[-1]).long()
    lps = lps.reshape(-1, lps.shape[-1])
    _check_index_range("teacher_topk[0] (ids)", ids, vocab, None, "the student vocabulary")
    return ids, lps


def check_args(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    labels: Any,
    *,
    student_bias: Any,
    teacher_bias: Any,
    teacher_topk: Any,
    divergence: Any,
    beta: Any,
    temperature: Any,
    t2_scale: Any,
    alpha: Any,
    ignore_index: Any,
    num_items_in_batch: Any,
    softcap: Any,
    logit_scale: Any,
    reduction: Any,
    teacher_softcap: Any = SHARED,
    teacher_logit_scale: Any = SHARED,
) -> tuple[KDInputs, KDConfig]:
    """Validate every argument, flatten leading dims, drop padded teacher vocab rows; raise ValueError/TypeError
    naming the offending argument. ``teacher_softcap`` / ``teacher_logit_scale`` = :data:`SHARED` take the
    shared ``softcap`` / ``logit_scale``. Checks run student, scalars, labels, teacher, in that order (the first
    failing one raises)."""
    sh, sw, sb = _check_student(student_hidden, student_weight, student_bias)
    vocab = sw.shape[0]
    teacher_softcap, teacher_logit_scale = _check_scalars(
        divergence=divergence, beta=beta, temperature=temperature, t2_scale=t2_scale, alpha=alpha,
        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, softcap=softcap, logit_scale=logit_scale,
        reduction=reduction, teacher_softcap=teacher_softcap, teacher_logit_scale=teacher_logit_scale,
    )
    lab = _check_labels(labels, sh, vocab, ignore_index)

    # -- teacher: dense (hidden + weight) or sparse top-k, not both
    th = tw = tb = ids = lps = None
    dense = teacher_hidden is not None or teacher_weight is not None
    if dense and teacher_topk is not None:
        _fail("teacher_topk", "cannot be combined with teacher_hidden/teacher_weight: give one teacher")
    if dense:
        th, tw, tb = _check_dense_teacher(teacher_hidden, teacher_weight, teacher_bias, sh, vocab)
    elif teacher_bias is not None:
        _fail("teacher_bias", "was given without teacher_hidden/teacher_weight")
    if teacher_topk is not None:
        ids, lps = _check_topk_teacher(teacher_topk, sh, vocab)

    has_teacher = tw is not None or ids is not None
    if lab is None and not has_teacher:
        _fail("labels", "is None and no teacher was given: there is nothing to compute")
    if alpha > 0 and not has_teacher:
        _fail("alpha", f"is {alpha} but no teacher was given (teacher_hidden/teacher_weight or teacher_topk); "
              "use alpha=0 for CE only")

    inputs = KDInputs(
        student_hidden=sh.reshape(-1, sh.shape[-1]),
        student_weight=sw,
        student_bias=sb,
        teacher_hidden=th,
        teacher_weight=tw,
        teacher_bias=tb,
        labels=lab,
        topk_ids=ids,
        topk_logprobs=lps,
        lead_shape=tuple(sh.shape[:-1]),
    )
    config = KDConfig(
        divergence=canonical_divergence(divergence, float(beta)),
        beta=float(beta),
        temperature=float(temperature),
        kd_scale=float(temperature) ** 2 if t2_scale else 1.0,
        alpha=float(alpha),
        ignore_index=int(ignore_index),
        softcap=None if softcap is None else float(softcap),
        logit_scale=float(logit_scale),
        reduction=reduction,
        teacher_softcap=None if teacher_softcap is None else float(teacher_softcap),
        teacher_logit_scale=float(teacher_logit_scale),
    )
    return inputs, config
