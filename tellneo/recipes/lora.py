"""LoRA settings and their attachment: :class:`LoraSettings` (PEFT ``LoraConfig`` fields, the one home of the
recipes' LoRA defaults), the variants PEFT offers (:data:`LORA_VARIANTS`) and :func:`attach_lora`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LORA_VARIANTS", "LoraSettings", "attach_lora", "lora_config_kwargs"]

#: LoRA variants, each a PEFT ``LoraConfig`` switch: ``lora`` (plain; scaling alpha / r), ``rslora`` (rank-stabilised
#: scaling alpha / sqrt(r)), ``dora`` (weight-decomposed: a learned magnitude per output feature times the
#: normalised adapted weight), ``pissa`` (A and B initialised from the principal singular vectors of each weight;
#: the base keeps the residual).
LORA_VARIANTS = ("lora", "rslora", "dora", "pissa")
_VARIANT_KWARGS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter configuration (PEFT ``LoraConfig`` fields).

    Defaults: rank 16, alpha 32, dropout 0.05 on every linear layer of the decoder (PEFT's ``"all-linear"``, which
    leaves the output head alone), plain LoRA (``variant``: one of :data:`LORA_VARIANTS`). ``patch=True`` routes
    the adapters' forward through :func:`tellneo.ops.lora_linear` (:func:`tellneo.integrations.peft.patch`) where
    it supports the layer (see the patch report); results are PEFT's either way. ``extra``: any other
    ``LoraConfig`` field (it may not set what ``variant`` sets).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    patch: bool = True
    backend: str = "auto"
    extra: Mapping[str, Any] = field(default_factory=dict)
    variant: str = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.variant not in LORA_VARIANTS:
            raise ValueError(f"LoRA variant must be one of {', '.join(LORA_VARIANTS)}, got {self.variant!r}")
        clash = sorted(set(self.extra) & set(_VARIANT_KWARGS[self.variant]))
        if clash:
            raise ValueError(f"LoRA extra sets {', '.join(clash)}, which variant={self.variant!r} sets: use one")

    def replace(self, **changes: Any) -> LoraSettings:
        """A copy with the given fields changed; ``None`` values leave a field as it is (unset flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if not isinstance(self.target_modules, str) else \
            self.target_modules
        d["extra"] = dict(self.extra)
        return d


def lora_config_kwargs(settings: LoraSettings) -> dict[str, Any]:
    """The ``peft.LoraConfig`` keyword arguments of ``settings`` (``task_type="CAUSAL_LM"``; the variant's switch:
    ``use_rslora`` / ``use_dora`` / ``init_lora_weights="pissa"``)."""
    target = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return dict(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=target,
                task_type="CAUSAL_LM", **_VARIANT_KWARGS[settings.variant], **dict(settings.extra))


def attach_lora(model: nn.Module, settings: LoraSettings = LoraSettings()) -> nn.Module:
    """Freeze ``model`` and wrap it in a PEFT LoRA model (:func:`lora_config_kwargs`); with ``settings.patch`` the
    LoRA layers the fused op supports run :func:`tellneo.ops.lora_linear` (the report, which names the layers left
    on PEFT's forward and why, is logged and kept as ``model.tellneo_patch_report``). Returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    from tellneo.integrations.peft import patch

    peft_model = get_peft_model(model, LoraConfig(**lora_config_kwargs(settings)))
    report = patch(peft_model, backend=settings.backend) if settings.patch else None
    peft_model.tellneo_patch_report = report
    return peft_model
