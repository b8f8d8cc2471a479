"""tellneo: token-efficient fine-tuning (TELL) and LoRA distillation (LLM-NEO) of causal LMs, with fused kernels.

Submodules are imported on first use (``tellneo.data``, ``tellneo.ops``, ...); importing ``tellneo`` itself
does no GPU query and loads no native code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "ops", "integrations", "recipes", "kernels")


def info() -> str:
    """Versions, available backends and build flags, as printed by ``tellneo info``."""
    from tellneo._info import info_text

    return info_text()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"tellneo.{name}")
    raise AttributeError(f"module 'tellneo' has no attribute {name!r}")


__all__ = ["__version__", "info", *_SUBMODULES]
