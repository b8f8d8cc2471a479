"""Former home of the Trainer pieces, kept so that old imports work: they are in :mod:`tellneo.recipes.training`
(the checkpoint-directory helpers in :mod:`tellneo.recipes.run_dir`)."""

from tellneo.recipes.run_dir import CHECKPOINT_PREFIX, clean_staging, last_checkpoint
from tellneo.recipes.training import (
    WARMUP_RATIO_ATTR,
    InterruptCallback,
    MetricsJsonlCallback,
    NonFiniteError,
    RecipeTrainerMixin,
    read_metrics,
    warmup_steps,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "InterruptCallback",
    "MetricsJsonlCallback",
    "NonFiniteError",
    "RecipeTrainerMixin",
    "WARMUP_RATIO_ATTR",
    "clean_staging",
    "last_checkpoint",
    "read_metrics",
    "warmup_steps",
]
