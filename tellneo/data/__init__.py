"""TELL's data path and the packed-sequence mixer.

* :class:`TokenStore` — tokenized samples (flat tokens + offsets + optional labels), from lists, arrays or
  ``datasets.Dataset``.
* :func:`plan` / :class:`Plan` — bin packing into rows (``bfd``, ``ffd``, ``wrap``) in C++.
* :func:`emit_rows` / :func:`emit_samples` — training tensors from a plan (C++ on CPU, CUDA on GPU, bit-identical).
* :func:`pack` — plan + emit for a list of sequences.
* :func:`tell_mix` / :func:`tell_mix_store` / :func:`mix_order` — anchor prompt + extensive shuffle.
* :class:`PackedDataset`, :class:`PackedBatchSampler`, :class:`PackedCollator` — for ``transformers.Trainer`` and
  hand-written loops, deterministic in (seed, epoch, step), disjoint across ranks and workers.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule, imported on first use: the CLI builds its flags from tellneo.data.tasks, and importing the
# package must not load torch (tellneo.data.dataset) or the native mixer just for ``--help``
_HOME = {
    "PackedBatchSampler": "dataset", "PackedCollator": "dataset", "PackedDataset": "dataset",
    "trained_tokens": "dataset",
    "emit_rows": "emit", "emit_rows_reference": "emit", "emit_samples": "emit", "emit_segments": "emit",
    "pack": "packing",
    "Plan": "planning", "plan": "planning", "plan_reference": "planning",
    "anchor_token_ids": "tell", "anchored_task_store": "tell", "build_anchor_prompt": "tell",
    "neutral_anchor_text": "tell", "mix_order": "tell", "num_task_slots": "tell", "tell_mix": "tell",
    "tell_mix_store": "tell",
    "IGNORE_INDEX": "tokens", "TokenStore": "tokens",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tellneo.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tellneo.data.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "IGNORE_INDEX",
    "PackedBatchSampler",
    "PackedCollator",
    "PackedDataset",
    "Plan",
    "TokenStore",
    "anchor_token_ids",
    "anchored_task_store",
    "build_anchor_prompt",
    "neutral_anchor_text",
    "emit_rows",
    "emit_rows_reference",
    "emit_samples",
    "emit_segments",
    "mix_order",
    "num_task_slots",
    "pack",
    "plan",
    "plan_reference",
    "tell_mix",
    "tell_mix_store",
    "trained_tokens",
]

assert set(__all__) == set(_HOME), "tellneo.data: __all__ and the lazy-import table disagree"
