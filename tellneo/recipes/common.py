"""Model helpers shared by the NEO and TELL recipes: LoRA attachment (PEFT + tellneo's fused forward), the parts
of a causal LM the fused loss needs (decoder body, output head), last hidden states without logits, and a plain
float copy of a model loaded from GGUF.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("tellneo")

__all__ = [
    "LoraSettings",
    "RecipeError",
    "attach_lora",
    "count_parameters",
    "decoder_of",
    "float_copy",
    "last_hidden_state",
    "output_head",
    "unwrap",
]


class RecipeError(ValueError):
    """A recipe cannot run with the given configuration or data (the CLI prints it as one line, exit status 2)."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter configuration (PEFT ``LoraConfig`` fields).

    Defaults: rank 16, alpha 32, dropout 0.05 on every linear layer of the decoder (PEFT's ``"all-linear"``, which
    leaves the output head alone). ``patch=True`` routes the adapters' forward through
    :func:`tellneo.ops.lora_linear` (:func:`tellneo.integrations.peft.patch`); results are PEFT's either way.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    patch: bool = True
    backend: str = "auto"
    extra: Mapping[str, Any] = field(default_factory=dict)  # any other LoraConfig field, e.g. {"use_rslora": True}

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if not isinstance(self.target_modules, str) else \
            self.target_modules
        d["extra"] = dict(self.extra)
        return d


def attach_lora(model: nn.Module, settings: LoraSettings = LoraSettings()) -> nn.Module:
    """Freeze ``model`` and wrap it in a PEFT LoRA model (``task_type="CAUSAL_LM"``); with ``settings.patch`` the
    supported LoRA layers run :func:`tellneo.ops.lora_linear` (the report is logged and kept as
    ``model.tellneo_patch_report``). Returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    from tellneo.integrations.peft import patch

    target = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target, task_type="CAUSAL_LM", **dict(settings.extra))
    peft_model = get_peft_model(model, config)
    report = patch(peft_model, backend=settings.backend) if settings.patch else None
    peft_model.tellneo_patch_report = report
    return peft_model


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


def teacher_hidden_state(teacher: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``[B, T, H]`` final hidden states of a frozen teacher, under ``no_grad``: :func:`last_hidden_state`, so the
    root module is called (an FSDP2-sharded teacher gathers its parameters in the root's hooks) and no logits are
    computed."""
    with torch.no_grad():
        return last_hidden_state(teacher, inputs)


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
