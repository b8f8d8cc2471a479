"""A causal LM's output head as the fused loss sees it: the ``lm_head`` Linear plus the model's final-logit transform.

Several families do more than ``hidden @ W^T (+ b)`` after the decoder (read from the installed transformers'
``*ForCausalLM.forward``):

=============================================  ================================================================
family (``config.model_type``)                 logits
=============================================  ================================================================
gemma2, gemma3_text, vaultgemma                ``c * tanh(lm_head(h) / c)``, ``c = config.final_logit_softcapping``
cohere, cohere2, cohere2_moe                   ``lm_head(h) * model.logit_scale`` (from ``config.logit_scale``)
granite, granitemoe, granitemoeshared,         ``lm_head(h) / config.logits_scaling``
granitemoehybrid, granite_swa, granitemoe_swa
hyperclovax                                    ``lm_head(h) * config.logits_scaling`` (multiplied, unlike Granite)
=============================================  ================================================================

:func:`head_transform` reads that transform for one model (student and teacher each have their own) and refuses,
with a message naming what is unknown, a model it cannot describe: an output head that is not a plain
``torch.nn.Linear`` (e.g. LoRA on ``lm_head``) directly after the decoder body (BERT-style prediction heads put
layers in between), or a config attribute that looks like a logit transform
(``*logit*``, ``*lm_head*``, ``output_multiplier``) with a non-trivial value on a family not in the table. Nothing
is computed silently with the wrong logits. :func:`kd_transform_kwargs` turns two transforms into the
``softcap`` / ``logit_scale`` / ``teacher_softcap`` / ``teacher_logit_scale`` arguments of
:func:`tellneo.ops.fused_linear_kd`; :func:`head_logits` is the plain-PyTorch logits of a ``[N, H]`` chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tellneo.ops import fused_linear_kd
from tellneo.ops.divergences import transform_logits
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.model_parts import _transformers_model, output_head

__all__ = ["HeadTransform", "OutputHead", "UnsupportedHeadError", "fused_head_loss", "head_logits",
           "head_transform", "kd_transform_kwargs", "read_head"]


class UnsupportedHeadError(RecipeError):
    """The model's output head is not a plain Linear followed by a known logit transform."""


@dataclass(frozen=True)
class HeadTransform:
    """``logits = softcap * tanh(logit_scale * z / softcap)`` (or ``logit_scale * z`` without softcap), with
    ``z = h W^T + b``: scale first, then the soft cap, as :func:`tellneo.ops.fused_linear_kd` applies them."""

    logit_scale: float = 1.0
    softcap: float | None = None
    family: str = ""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transformed logits (same shape and dtype)."""
        return transform_logits(logits, self.logit_scale, self.softcap)


@dataclass(frozen=True)
class OutputHead:
    """``weight [V, H]``, ``bias [V] | None`` (full tensors, also under FSDP) and the model's transform."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: HeadTransform


# model_type -> ((attribute, how it enters the logits, where it is read), ...)
_SOFTCAP = (("final_logit_softcapping", "softcap", "config"),)
_COHERE = (("logit_scale", "multiply", "module"),)
_GRANITE = (("logits_scaling", "divide", "config"),)
_RULES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "gemma2": _SOFTCAP, "gemma3_text": _SOFTCAP, "vaultgemma": _SOFTCAP,
    "cohere": _COHERE, "cohere2": _COHERE, "cohere2_moe": _COHERE,
    "granite": _GRANITE, "granitemoe": _GRANITE, "granitemoeshared": _GRANITE, "granitemoehybrid": _GRANITE,
    "granite_swa": _GRANITE, "granitemoe_swa": _GRANITE,
    "hyperclovax": (("logits_scaling", "multiply", "config"),),
}
# Config attributes that look like a logit transform. Those acting inside the decoder body (attention / router
# softcapping) or not on the values (how many logits to keep, chunking, a bias flag) are not transforms.
_SUSPECT = re.compile(r"logit|lm_head|output_mult")
_INSIDE_BODY = re.compile(r"attn|attention|router")
_NOT_TRANSFORMS = frozenset({"num_logits_to_keep", "chunk_size_lm_head", "lm_head_bias", "freeze_lm_head"})


def _number(name: str, value: Any, family: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UnsupportedHeadError(f"{family}: {name} = {value!r} is not a finite number > 0")
    return float(value)


def _unknown_transforms(config: Any, known: set[str]) -> list[str]:
    found = []
    for name, value in sorted(vars(config).items()):
        if name in known or name in _NOT_TRANSFORMS or not _SUSPECT.search(name) or _INSIDE_BODY.search(name):
            continue
        if value is None or isinstance(value, (bool, str, list, tuple, dict)):
            continue
        if isinstance(value, (int, float)) and ("cap" not in name and value == 1):
            continue  # a multiplier or divisor of 1 is the identity, whichever it is
        found.append(f"{name}={value!r}")
    return found


def _check_nothing_between(lm: nn.Module, head: nn.Module) -> None:
    """The head must be a direct child of the model beside the decoder body, with no other module holding
    parameters there: BERT-style ``*ForCausalLM`` models (``cls.predictions``: dense + activation + norm before
    the decoder Linear) or ModernBERT's prediction head put layers between the hidden states and the Linear."""
    name = type(lm).__name__
    children = dict(lm.named_children())
    prefix = getattr(lm, "base_model_prefix", "")
    body = children.get(prefix)
    if body is None:
        raise UnsupportedHeadError(f"{name} has no decoder body .{prefix or 'model'} beside its output head")
    if not any(child is head for child in children.values()):
        raise UnsupportedHeadError(
            f"{name}'s output head is nested inside another module, not a direct child of the model: layers may "
            "sit between the final hidden states and it, which the fused loss would skip")
    extra = [n for n, child in children.items() if child is not head and child is not body
             and next(child.parameters(), None) is not None]
    if extra:
        raise UnsupportedHeadError(
            f"{name} has modules with parameters beside its decoder body and output head ({', '.join(extra)}): "
            "they may sit between the final hidden states and the head, which the fused loss would skip")


def head_transform(model: nn.Module) -> HeadTransform:
    """The final-logit transform of ``model`` (through PEFT / DDP / FSDP wrappers), after checking its head.

    Raises :class:`UnsupportedHeadError` (a ValueError) naming the module class or config attribute when the
    output head is not a plain ``torch.nn.Linear`` beside the decoder body (nothing else with parameters at the
    top level), or the config holds a logit transform this module does not know.
    """
    lm = _transformers_model(model)
    name = type(lm).__name__
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedHeadError(f"{name} has no output head (get_output_embeddings() is None)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedHeadError(
            f"{name}'s output head is a {type(head).__module__}.{type(head).__qualname__}, not a plain "
            "torch.nn.Linear: the fused loss reads the head's weight and bias directly (LoRA or other adapters on "
            "lm_head are not supported; leave lm_head out of the adapter's target modules)")
    _check_nothing_between(lm, head)
    config = getattr(lm, "config", None)
    if config is None:
        return HeadTransform(family=name)
    family = getattr(config, "model_type", "") or name
    rules = _RULES.get(family, ())
    unknown = _unknown_transforms(config, {attr for attr, _, _ in rules})
    if unknown:
        raise UnsupportedHeadError(
            f"{name} (model_type {family!r}) has config attributes that look like a final-logit transform tellneo "
            f"does not know for this family: {', '.join(unknown)}; refusing rather than computing the loss on "
            "other logits than the model's")
    scale, softcap = 1.0, None
    for attr, kind, source in rules:
        value = getattr(lm if source == "module" else config, attr, None)
        if value is None:
            if kind == "softcap":
                continue
            value = getattr(config, attr, None)
            if value is None:
                raise UnsupportedHeadError(f"{name} (model_type {family!r}) has no {attr}")
        number = _number(attr, value, family)
        if kind == "softcap":
            softcap = number
        elif kind == "multiply":
            scale *= number
        else:
            scale /= number
    return HeadTransform(logit_scale=scale, softcap=softcap, family=family)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded (FSDP2 / DTensor) parameter gathered to the full local tensor, others unchanged.

    A head in the FSDP root's parameter group is already unsharded after the forward (the root keeps its
    parameters until the backward) and arrives here as a plain tensor. A head sharded on its own is a DTensor:
    it is all-gathered, and its gradient is averaged over the mesh on the way back (``Partial("avg")``: the
    reduce-scatter FSDP2 does for every other parameter), so ranks with different data get FSDP's mean gradient.
    """
    if t is None or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(t, DTensor):
        return t
    if not (t.requires_grad and torch.is_grad_enabled()):
        return t.full_tensor()
    ndim = t.device_mesh.ndim
    return t.redistribute(placements=[Replicate()] * ndim).to_local(grad_placements=[Partial("avg")] * ndim)


def read_head(model: nn.Module, transform: HeadTransform | None = None) -> OutputHead:
    """The output head of ``model``: weight and bias (gathered when sharded) and its transform
    (``transform``, e.g. one read once by :func:`head_transform`, or read now)."""
    weight, bias = output_head(model)
    return OutputHead(_full(weight), _full(bias), transform if transform is not None else head_transform(model))


def head_logits(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` float32 logits of ``hidden [..., H]`` exactly as the model's forward computes them (the matmul
    in the head's dtype, then the transform in fp32)."""
    return head.transform.apply(F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float())


def kd_transform_kwargs(student: HeadTransform, teacher: HeadTransform | None = None) -> dict[str, Any]:
    """``softcap`` / ``logit_scale`` (the student's) and ``teacher_softcap`` / ``teacher_logit_scale`` (the
    teacher's; omitted without a teacher) for :func:`tellneo.ops.fused_linear_kd`."""
    kwargs: dict[str, Any] = {"softcap": student.softcap, "logit_scale": student.logit_scale}
    if teacher is not None:
        kwargs.update(teacher_softcap=teacher.softcap, teacher_logit_scale=teacher.logit_scale)
    return kwargs


def fused_head_loss(
    student_hidden: torch.Tensor,
    labels: torch.Tensor | None,
    student: OutputHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher: OutputHead | None = None,
    **op_kwargs: Any,
) -> Any:
    """:func:`tellneo.ops.fused_linear_kd` through the models' own heads, on already aligned rows.

    ``student_hidden`` ``[N, Hs]``, ``labels`` ``[N]`` (already shifted) or None, ``teacher_hidden`` ``[N, Ht]``
    or None (``teacher_topk=`` may come in ``op_kwargs`` instead). Each model's final-logit transform is its own
    (:func:`kd_transform_kwargs`). Autocast as a plain ``lm_head`` under ``torch.autocast``: hidden states and head
    weights are cast to the autocast dtype and the op runs with autocast off (it accumulates in fp32 itself).
    ``op_kwargs``: the op's other options (``alpha``, ``divergence``, ``num_items_in_batch``, ``return_parts``,
    ``backend``, ...); ``reduction`` defaults to ``"mean"``.
    """
    device = student_hidden.device.type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def to(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or like is None else t.to(cast or like.dtype)

    tw = teacher.weight if teacher is not None else None
    op_kwargs.setdefault("reduction", "mean")
    with torch.autocast(device, enabled=False):
        return fused_linear_kd(
            to(student_hidden, student.weight), to(student.weight, student.weight),
            to(teacher_hidden, tw), to(tw, tw), labels,
            student_bias=to(student.bias, student.weight),
            teacher_bias=to(teacher.bias if teacher is not None else None, tw),
            **kd_transform_kwargs(student.transform, teacher.transform if teacher is not None else None),
            **op_kwargs,
        )
