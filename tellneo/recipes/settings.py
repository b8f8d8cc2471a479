"""The recipes' loss and preset settings, importable without loading transformers (the CLI's flags use them):
:class:`KDSettings`, :class:`NeoPreset` and the named distillation presets :data:`PRESETS`, and the training
modes :data:`MODES`. LoRA settings are in :mod:`tellneo.recipes.lora`, training-loop settings in
:mod:`tellneo.recipes.training`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from tellneo._names import DIVERGENCES  # = tellneo.ops.DIVERGENCES, without importing torch
from tellneo.recipes.lora import LoraSettings

__all__ = [
    "DEFAULT_PRESET",
    "DIVERGENCES",
    "KDSettings",
    "LR_SCHEDULERS",
    "MODES",
    "NEO_PRESET",
    "NeoPreset",
    "PRESETS",
    "PRESET_FIELDS",
    "TELL_METHODS",
    "TELL_SPREADS",
    "TELL_TRAIN_DEFAULTS",
    "TRAIN_DEFAULTS",
]

#: what a recipe trains: LoRA adapters only, or every weight
MODES = ("lora", "full")
#: the TELL recipe's arms (``TellConfig.method``) and placements of the task samples (``TellConfig.spread``)
TELL_METHODS = ("tell", "sft")
TELL_SPREADS = ("stratified", "random", "end")
#: the learning-rate schedules the recipes offer (``transformers`` ``lr_scheduler_type`` names)
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
#: the :class:`tellneo.recipes.training.TrainSettings` fields a recipe decides when they are left ``None``
PRESET_FIELDS = ("epochs", "learning_rate", "lr_scheduler", "warmup_ratio")
#: what ``TrainSettings.training_arguments`` uses for fields no recipe resolved (``TrainSettings()`` on its own)
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 1.0, "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.1}
#: what ``run_tell`` uses for them
TELL_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 1.0, "learning_rate": 1e-3, "lr_scheduler": "cosine",
                                       "warmup_ratio": 0.1}


@dataclass(frozen=True)
class KDSettings:
    """Options of the distillation loss (see :func:`tellneo.ops.fused_linear_kd`).

    ``alpha``: KD weight (CE gets ``1 - alpha``); 0 trains CE only and needs no teacher.
    ``divergence``: ``forward_kl`` (KL(teacher || student)), ``reverse_kl`` or ``jsd`` (with ``beta``).
    ``temperature`` divides both models' logits in the KD term; ``t2_scale`` multiplies KD by ``T**2``.
    """

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    t2_scale: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KD weight alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")

    def replace(self, **changes: Any) -> KDSettings:
        """A copy with the given fields changed; ``None`` values leave a field as it is (unset flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class NeoPreset:
    """A named distillation configuration: LoRA, loss and optimiser settings (:data:`PRESETS`).

    ``alpha_per_rank``: when set, a LoRA rank given without an alpha gets ``alpha = alpha_per_rank * r`` (the NEO
    authors' alpha = 2 x rank); otherwise the preset's alpha stays.
    """

    lora: LoraSettings
    kd: KDSettings
    learning_rate: float
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    alpha_per_rank: float | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    def train_defaults(self) -> dict[str, Any]:
        """The :class:`tellneo.recipes.training.TrainSettings` fields this preset decides."""
        return {"learning_rate": self.learning_rate, "lr_scheduler": self.lr_scheduler_type,
                "warmup_ratio": self.warmup_ratio, "epochs": self.num_train_epochs}

    def lora_with(self, *, r: int | None = None, alpha: float | None = None, **changes: Any) -> LoraSettings:
        """The preset's LoRA settings with the given (not ``None``) fields changed; see ``alpha_per_rank``."""
        if alpha is None and r is not None and self.alpha_per_rank is not None:
            alpha = self.alpha_per_rank * r
        return self.lora.replace(r=r, alpha=alpha, **changes)


#: The recipe's own defaults (a short CPU run): LoRA rank 16, alpha 32, dropout 0.05, KD weight 0.5, forward KL,
#: T = 1, lr 1e-3, cosine schedule with 10% warm-up.
DEFAULT_PRESET = NeoPreset(
    lora=LoraSettings(),
    kd=KDSettings(),
    learning_rate=1e-3,
    notes="tellneo's defaults for a short CPU run: LoRA r16 / alpha 32 / dropout 0.05, KD weight 0.5, forward KL, "
          "lr 1e-3, cosine schedule with 10% warm-up.",
)

#: The LLM-NEO authors' configuration (their code defaults; their released Llama-3.2-1B student used KD weight 0.9,
#: rank 128, lr 1e-4 with a Llama-3.1-8B-Instruct teacher). Unlike their code, the KD mask is the CE mask (no
#: one-position shift between them) and the teacher keeps its dtype (no fp16 cast).
NEO_PRESET = NeoPreset(
    lora=LoraSettings(r=64, alpha=128.0, dropout=0.0),
    kd=KDSettings(alpha=0.5, temperature=1.0, divergence="forward_kl"),
    learning_rate=2e-4,
    lr_scheduler_type="cosine",
    warmup_ratio=0.1,
    num_train_epochs=1.0,
    alpha_per_rank=2.0,
    notes="LLM-NEO (Yang et al., arXiv 2411.06839): forward KL, no temperature, LoRA on all linear layers, "
          "alpha = 2 x rank, dropout 0, KD weight 0.5, rank 64, lr 2e-4 (10x the full-parameter 2e-5), cosine "
          "schedule with 10% warm-up, one epoch.",
)

#: The presets of ``tellneo distill --preset`` / ``DistillConfig(preset=...)``, by name.
PRESETS: dict[str, NeoPreset] = {"default": DEFAULT_PRESET, "neo": NEO_PRESET}
