"""Drop-in for Hugging Face causal LMs: ``model(input_ids, labels=...)`` trains through tellneo's fused
``lm_head`` + CE (and, with a teacher, + KD) loss, without building the ``[tokens, vocab]`` logits.

``patch_causal_lm(model)`` plays the role ``apply_liger_kernel_to_*`` / ``use_liger_kernel`` play for Liger, but
per instance and reversibly: it sets an instance-level ``forward`` on the ``*ForCausalLM`` inside ``model``
(through PEFT / DDP / ``torch.compile`` wrappers; nothing global is rebound, nothing happens at import time) and
returns a :class:`CausalLMPatch` whose :meth:`~CausalLMPatch.undo` restores the model's own forward.

When the patched forward runs **in training mode with labels** it calls the model's own forward with
``logits_to_keep`` empty (the head projects zero positions), takes the final hidden states from the decoder body,
keeps the rows whose shifted label is not ``-100`` and returns ``loss = fused_linear_kd(...)`` with
``logits=None``. The loss is the model's own: the HF causal-LM loss (labels shifted left by one, or
``shift_labels`` used as given; ``mean`` over the valid tokens, or ``sum / num_items_in_batch`` when the
``transformers.Trainer`` passes ``num_items_in_batch``), so ``Trainer`` (gradient accumulation included) and
TRL's ``SFTTrainer`` work unchanged. With ``teacher=`` the loss is ``(1 - alpha) CE + alpha KD(teacher ||
student)`` (:class:`tellneo.recipes.neo.KDSettings`), the teacher run under ``no_grad`` on the same
``input_ids`` / ``attention_mask`` / ``position_ids``.

Every other call (no labels, eval mode, ``generate``) is the model's own forward, with logits. A mixture-of-experts
model called with ``output_router_logits`` gets its router loss added as its own forward adds it
(``router_aux_loss_coef * aux_loss``). Under
``torch.autocast`` the head matmul runs in the autocast dtype (as the model's ``lm_head`` would); the loss is
accumulated in fp32 (the HF loss also upcasts).

TRL's ``SFTTrainer`` (TRL >= 1.x) installs its own chunked LM head and computes its training loss through it
(``fused_lm_head=True``), which bypasses this patch; training is unchanged and correct either way.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tellneo.recipes.head import fused_head_loss, head_transform, read_head

__all__ = ["CausalLMPatch", "is_patched", "patch_causal_lm"]

logger = logging.getLogger("tellneo")

_MARK = "_tellneo_causal_lm_patch"  # instance attribute holding the patch state (its presence = patched)
# forward arguments that only the loss consumes (never passed to the model's own forward on the fused path)
_LOSS_ONLY = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _target(model: nn.Module) -> nn.Module:
    from tellneo.recipes.model_parts import _transformers_model, decoder_of

    lm = _transformers_model(model)
    decoder_of(lm)  # raises TypeError naming the class for a model without a decoder body
    if lm.get_output_embeddings() is None:
        raise TypeError(f"{type(lm).__name__} has no output head (get_output_embeddings() is None)")
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        raise TypeError(f"{type(lm).__name__}.forward takes no logits_to_keep argument, so its logits cannot be "
                        "skipped; patch_causal_lm supports transformers *ForCausalLM models")
    return lm


def _aligned_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int
                    ) -> torch.Tensor:
    """Labels aligned with the hidden rows, as HF's ``ForCausalLMLoss`` aligns them."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _as_keywords(lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(type(lm).forward).bind(lm, *args, **kwargs).arguments
    extra = {}
    for name, param in inspect.signature(type(lm).forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = bound.pop(name, {})
    bound.pop("self", None)
    return {**bound, **extra}


def _fused_forward(lm: nn.Module, state: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    from tellneo.recipes.model_parts import _capture_output, decoder_of, hidden_state_no_grad

    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    num_items = kwargs.get("num_items_in_batch")
    ignore_index = kwargs.get("ignore_index", -100)
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY}
    if kwargs.get("logits_to_keep") not in (None, 0):
        raise ValueError("patch_causal_lm: logits_to_keep cannot be combined with labels in training mode (the "
                         "fused loss covers every position); undo the patch for this call")
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    model_kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=ref.device)
    return_dict = model_kwargs.pop("return_dict", None)
    body = decoder_of(lm)
    with _capture_output(body) as captured:
        out = state["original"](**model_kwargs, return_dict=True)
    if len(captured) != 1:
        raise RuntimeError(f"patch_causal_lm: expected one decoder call, saw {len(captured)}")
    hidden = captured[0].last_hidden_state if hasattr(captured[0], "last_hidden_state") else captured[0][0]
    aligned = _aligned_labels(labels, shift_labels, ignore_index).to(hidden.device)
    valid = aligned != ignore_index
    teacher_rows = teacher_spec = None
    teacher = state["teacher"]
    kd = state["kd"]
    if teacher is not None and kd.alpha > 0:
        teacher_inputs = {k: model_kwargs[k] for k in _MODEL_INPUTS if model_kwargs.get(k) is not None}
        teacher_rows = hidden_state_no_grad(teacher, teacher_inputs)[valid]
        teacher_spec = read_head(teacher, state["teacher_transform"])
    parts = fused_head_loss(
        hidden[valid], aligned[valid], read_head(lm, state["transform"]), teacher_rows, teacher_spec,
        num_items_in_batch=num_items,
        ignore_index=ignore_index, alpha=kd.alpha if teacher is not None else 0.0, divergence=kd.divergence,
        beta=kd.beta, temperature=kd.temperature, t2_scale=kd.t2_scale, backend=state["backend"],
        return_parts=True,
    )
    state["last_parts"] = parts
    loss = parts.loss
    aux = getattr(out, "aux_loss", None)
    if aux is not None:  # MoE with output_router_logits: the model adds its router loss to the LM loss
        if not hasattr(lm, "router_aux_loss_coef"):
            raise ValueError(f"patch_causal_lm: {type(lm).__name__} returns an aux_loss without a "
                             "router_aux_loss_coef; its total loss is unknown here (undo the patch for it)")
        loss = loss + lm.router_aux_loss_coef * aux.to(loss.device)
    out = type(out)(**{**out, "loss": loss, "logits": None})
    if return_dict is False or (return_dict is None and not getattr(lm.config, "return_dict", True)):
        return out.to_tuple()
    return out


class _PatchedForward:
    """Picklable, deep-copyable instance ``forward`` that keeps the model (and shows its own signature, which
    ``generate`` and ``Trainer`` inspect)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.__signature__ = inspect.signature(type(module).forward).replace(
            parameters=list(inspect.signature(type(module).forward).parameters.values())[1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        state = vars(module).get(_MARK)
        if state is None:  # undone while another wrapper still holds this forward: behave like the model
            return type(module).forward(module, *args, **kwargs)
        if not module.training:
            return state["original"](*args, **kwargs)
        if args:  # positional call: bind to the forward's parameter names so labels / input_ids are found
            kwargs = _as_keywords(module, args, kwargs)
        if kwargs.get("labels") is None:  # like the model: no labels, no loss (shift_labels alone is ignored)
            return state["original"](**kwargs)
        return _fused_forward(module, state, kwargs)


class CausalLMPatch:
    """Handle returned by :func:`patch_causal_lm`: :meth:`undo` (or leaving a ``with`` block) restores the
    model's own forward; ``last_parts`` is the :class:`tellneo.ops.fused_linear.KDLossOutput` of the last fused
    call (loss, ce, kd, num_tokens) for logging."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def last_parts(self) -> Any:
        state = vars(self.module).get(_MARK)
        return None if state is None else state.get("last_parts")

    def undo(self) -> bool:
        """Remove the patch; returns False if it was already removed."""
        state = vars(self.module).pop(_MARK, None)
        if state is None:
            return False
        current = vars(self.module).get("forward")
        if isinstance(current, _PatchedForward) and current.module is self.module:
            if state["instance_forward"] is not None:
                self.module.forward = state["instance_forward"]
            else:
                del self.module.forward
        else:  # another wrapper (TRL's fused head, an accelerate hook) went on top of ours: it now passes through
            logger.warning("tellneo: patch_causal_lm undo: forward was re-wrapped after the patch; our layer inside "
                           "it now defers to the model's own forward")
        return True

    def __enter__(self) -> CausalLMPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def is_patched(model: nn.Module) -> bool:
    """Whether the ``*ForCausalLM`` inside ``model`` currently has :func:`patch_causal_lm`'s forward."""
    from tellneo.recipes.model_parts import _transformers_model

    return _MARK in vars(_transformers_model(model))


def patch_causal_lm(model: nn.Module, *, teacher: nn.Module | None = None, kd: Any = None,
                    backend: str = "auto") -> CausalLMPatch:
    """Make ``model(..., labels=...)`` in training mode compute its loss with the fused ``lm_head`` + CE (+ KD)
    op and return ``logits=None``; everything else is unchanged. Returns the undo handle.

    Args:
        model: a transformers ``*ForCausalLM`` (Llama, Qwen, Mistral, Phi, ... anything whose forward takes
            ``logits_to_keep``), bare or inside PEFT / DDP / ``torch.compile`` wrappers. Patching again replaces
            the settings.
        teacher: optional frozen teacher with the student's token ids (its table may be larger: padded rows are
            dropped). It is put in eval mode with ``requires_grad`` off and must sit on the student's device.
        kd: :class:`tellneo.recipes.neo.KDSettings` (default: ``KDSettings()``, i.e. ``alpha=0.5``, forward KL);
            only used with a teacher. Its ``backend`` is ignored in favour of ``backend``.
        backend: :func:`tellneo.ops.fused_linear_kd` backend (``auto``: Triton on CUDA, chunked torch on CPU).

    Raises TypeError for a model without a decoder body, an output head or ``logits_to_keep``, and
    :class:`tellneo.recipes.head.UnsupportedHeadError` for a head that is not a plain Linear with a known
    final-logit transform (each model's own transform is applied: student and teacher may differ).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from tellneo.integrations.transformers import patch_causal_lm
    >>> torch.manual_seed(0) and None
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=1))
    >>> ids = torch.randint(0, 97, (2, 9))
    >>> stock = m(input_ids=ids, labels=ids).loss
    >>> handle = patch_causal_lm(m)
    >>> out = m(input_ids=ids, labels=ids)
    >>> out.logits is None, bool(torch.allclose(out.loss, stock, atol=1e-5))
    (True, True)
    >>> handle.undo(), m(input_ids=ids, labels=ids).logits.shape
    (True, torch.Size([2, 9, 97]))
    """
    from tellneo.recipes.neo import KDSettings, check_compatible

    lm = _target(model)
    kd = kd if kd is not None else KDSettings()
    transforms = {"transform": head_transform(lm),  # read (and an unsupported head refused) once, here
                  "teacher_transform": head_transform(teacher) if teacher is not None else None}
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        check_compatible(teacher, lm)
    existing = vars(lm).get(_MARK)
    if existing is not None:
        existing.update(teacher=teacher, kd=kd, backend=backend, **transforms)
        return CausalLMPatch(lm)
    state = {"original": lm.forward, "instance_forward": vars(lm).get("forward"), "teacher": teacher, "kd": kd,
             "backend": backend, "last_parts": None, **transforms}
    setattr(lm, _MARK, state)
    lm.forward = _PatchedForward(lm)
    return CausalLMPatch(lm)
