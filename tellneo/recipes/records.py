"""Instruction records for the recipes: the default general data, deterministic held-out splits, tokenization
into a :class:`tellneo.data.TokenStore` with clear errors for empty data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tellneo.data import TokenStore
from tellneo.recipes.common import RecipeError

__all__ = ["general_records", "split_records", "tokenize"]


def general_records(path: str | Path | None, max_samples: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """``(records, description)``: a data file (jsonl, parquet, arrow or a ``datasets`` save_to_disk directory;
    validated, errors name file and line/row; see :func:`tellneo.data.files.read_records`) or, with
    ``path=None``, the instruction pairs built from Python's own documentation (PSF license, no download)."""
    from tellneo.data.corpora import corpus_fingerprint, python_docs_pairs
    from tellneo.data.files import read_records

    if path is not None:
        records = read_records(path)
        source = f"{path} (fingerprint {corpus_fingerprint(records)})"
    else:
        records = python_docs_pairs()
        source = f"python-docs pairs (PSF license), fingerprint {corpus_fingerprint(records)}"
    if max_samples is not None:
        if max_samples <= 0:
            raise RecipeError(f"max-samples must be positive, got {max_samples}")
        records = records[:max_samples]
    return records, source


def split_records(records: Sequence[dict[str, Any]], held_out: int, seed: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: ``held_out`` records chosen by a seeded permutation (the same for a given seed and
    record list), the rest in their original order."""
    if held_out < 0:
        raise RecipeError(f"the held-out size must be >= 0, got {held_out}")
    if held_out >= len(records):
        raise RecipeError(f"cannot hold out {held_out} of {len(records)} records and still have training data")
    chosen = set(np.random.default_rng(seed).permutation(len(records))[:held_out].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    evaluation = [r for i, r in enumerate(records) if i in chosen]
    return train, evaluation


def tokenize(records: Sequence[dict[str, Any]], tokenizer: Any, *, what: str, vocab_size: int,
             prompt_prefix: str = "", max_tokens: int | None = None) -> TokenStore:
    """Chat-template tokenization with assistant-only labels; samples longer than ``max_tokens`` are dropped
    (a truncated answer would train the model to stop mid-sentence). Raises RecipeError if nothing trainable
    remains."""
    from tellneo.data.chat import tokenize_records

    if not records:
        raise RecipeError(f"the {what} data is empty")
    store = tokenize_records(records, tokenizer, prompt_prefix=prompt_prefix, vocab_size=vocab_size,
                             source=f"the {what} data")
    if max_tokens is not None:
        keep = np.flatnonzero(store.lengths <= max_tokens)
        if keep.size == 0:
            raise RecipeError(f"every {what} sample is longer than {max_tokens} tokens; raise --seq-len")
        if keep.size < len(store):
            store = store.take(keep)
    if store.labels is not None and not (store.labels != -100).any():
        raise RecipeError(f"the {what} data has no trained (assistant) tokens")
    return store
