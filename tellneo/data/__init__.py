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

from tellneo.data.dataset import PackedBatchSampler, PackedCollator, PackedDataset, trained_tokens
from tellneo.data.emit import emit_rows, emit_rows_reference, emit_samples, emit_segments
from tellneo.data.packing import pack
from tellneo.data.planning import Plan, plan, plan_reference
from tellneo.data.tell import (
    anchor_token_ids,
    anchored_task_store,
    build_anchor_prompt,
    neutral_anchor_text,
    mix_order,
    num_task_slots,
    tell_mix,
    tell_mix_store,
)
from tellneo.data.tokens import IGNORE_INDEX, TokenStore

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
