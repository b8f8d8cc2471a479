"""Former home of the recipes' shared helpers, kept so that old imports work: the error type is in
:mod:`tellneo.recipes.errors`, LoRA settings and attachment in :mod:`tellneo.recipes.lora`, the model parts
(decoder body, output head, hidden states, float copies) in :mod:`tellneo.recipes.model_parts`."""

from __future__ import annotations

from tellneo.recipes.errors import RecipeError
from tellneo.recipes.lora import LORA_VARIANTS, LoraSettings, attach_lora
from tellneo.recipes.model_parts import (  # noqa: F401 (the private ones: integrations used them from here)
    _capture_output,
    _transformers_model,
    count_parameters,
    decoder_of,
    float_copy,
    hidden_state_no_grad,
    last_hidden_state,
    output_head,
    teacher_hidden_state,
    unwrap,
)

__all__ = [
    "LORA_VARIANTS",
    "LoraSettings",
    "RecipeError",
    "attach_lora",
    "count_parameters",
    "decoder_of",
    "float_copy",
    "hidden_state_no_grad",
    "last_hidden_state",
    "output_head",
    "teacher_hidden_state",
    "unwrap",
]
