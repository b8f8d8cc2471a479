"""The parts of a causal LM the recipes reach into: wrappers peeled off (:func:`unwrap`), the decoder body and
the output head (:func:`decoder_of`, :func:`output_head`), last hidden states without logits
(:func:`last_hidden_state`), parameter counts, and a plain float copy of a model loaded from GGUF
(:func:`float_copy`)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "decoder_of",
    "float_copy",
    "hidden_state_no_grad",
    "last_hidden_state",
    "output_head",
    "teacher_hidden_state",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / ``torch.compile`` wrappers (``.module`` / ``._orig_mod`` chains)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _transformers_model(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder body of a causal LM (``LlamaForCausalLM.model``): returns hidden states, no logits.

    Works through PEFT and DDP wrappers. Raises TypeError for a model without a ``base_model_prefix`` body.
    """
    lm = _transformers_model(model)
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is lm:
        raise TypeError(f"{type(lm).__name__} has no decoder body (expected a *ForCausalLM with .{prefix or 'model'})")
    return body


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] | None)`` of the model's output head (``lm_head``), through PEFT/DDP wrappers."""
    head = _transformers_model(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no linear output head")
    return head.weight, getattr(head, "bias", None)


@contextmanager
def _capture_output(module: nn.Module) -> Iterator[list[Any]]:
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def last_hidden_state(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``[B, T, H]`` final (normed) hidden states of a causal LM, with no logits computed.

    The full model is called (through its wrappers, so DDP's forward hooks run and gradients are synchronised)
    with ``logits_to_keep`` = an empty index tensor, so the output head projects zero positions; the decoder
    body's output is taken with a forward hook. ``inputs``: ``input_ids`` ``[B, T]`` and optionally
    ``attention_mask`` / ``position_ids``; ``use_cache=False`` is forced (packed rows need it for sample isolation).
    """
    body = decoder_of(model)
    device = inputs["input_ids"].device
    with _capture_output(body) as captured:
        model(**inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call, saw {len(captured)}")
    out = captured[0]
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def hidden_state_no_grad(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``[B, T, H]`` final hidden states under ``no_grad`` (a frozen teacher, or any model being evaluated):
    :func:`last_hidden_state`, so the root module is called (an FSDP2-sharded model gathers its parameters in the
    root's hooks) and no logits are computed."""
    with torch.no_grad():
        return last_hidden_state(model, inputs)


#: the former name (it is called on students too)
teacher_hidden_state = hidden_state_no_grad


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared/tied tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def float_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain (trainable) copy of a causal LM: same class and weights, ``quantization_config`` removed.

    Models loaded from GGUF hold ordinary float tensors (transformers dequantises them) but stay flagged as
    GGUF-quantized, which the ``Trainer`` refuses to fine-tune; this copy is an ordinary model.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or next(model.parameters()).dtype
    new = type(model)(config).to(dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(new, "_tied_weights_keys", None) or {})
    if unexpected or any(k not in tied and not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"float_copy: state dicts differ (missing {missing}, unexpected {unexpected})")
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.train(model.training)
