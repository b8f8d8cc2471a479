"""Instruction records for the recipes: general data by name or file (drawn first-K or at random with a seed),
deterministic held-out splits, tokenization into a :class:`tellneo.data.TokenStore` with clear errors for empty
data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tellneo.data import TokenStore
from tellneo.recipes.common import RecipeError

__all__ = ["general_records", "split_records", "tokenize"]


def general_records(path: str | Path | None, max_samples: int | None = None, *, seed: int | None = None
                    ) -> tuple[list[dict[str, Any]], str]:
    """``(records, description)`` of the general data ``path`` names.

    ``path`` is a named pool (one of :data:`tellneo.data.general.GENERAL_SOURCES`: ``"python-docs"`` — the
    default for ``None`` —, ``"synthetic"``, ``"mixed"``; see :mod:`tellneo.data.general`) or a data file (jsonl,
    parquet, arrow or a ``datasets`` save_to_disk directory; validated, errors name file and line/row; see
    :func:`tellneo.data.files.read_records`). A name wins over a file of that name in the working directory
    only if there is none: with both, it raises (write the file's path with a directory, e.g. ``./data/mixed``).

    ``max_samples`` records are kept (all for ``None``): with ``seed=None`` the first ones (the behaviour the
    recorded runs used), with an integer ``seed`` a seeded random draw without replacement from the whole pool,
    in drawn order, so that the draw for ``n`` is a prefix of the draw for ``m > n``. With a ``seed`` and no
    ``max_samples`` the whole pool comes back in a seeded random order.
    """
    from tellneo.data.chat import DataFileError
    from tellneo.data.corpora import corpus_fingerprint
    from tellneo.data.files import read_records
    from tellneo.data.general import DEFAULT_GENERAL, GENERAL_SOURCES, named_general_pool

    if max_samples is not None and max_samples <= 0:
        raise RecipeError(f"max-samples must be positive, got {max_samples}")
    spec = DEFAULT_GENERAL if path is None else str(path)
    if spec in GENERAL_SOURCES:
        if path is not None and Path(spec).exists():
            raise RecipeError(f"general data {spec!r} is both a named source and a file in the working directory; "
                              f"pass the file by a path with a directory, e.g. {Path(spec).resolve()}")
        records, what = named_general_pool(spec)
        source = f"{what}, fingerprint {corpus_fingerprint(records)}"
    else:
        if not Path(spec).exists():
            raise DataFileError(f"{spec}: no such file or directory, and not a named general source (one of "
                                f"{', '.join(GENERAL_SOURCES)})")
        records = read_records(spec)
        source = f"{path} (fingerprint {corpus_fingerprint(records)})"
    if seed is None:
        if max_samples is not None:
            records = records[:max_samples]
    else:
        order = np.random.default_rng(seed).permutation(len(records))[:max_samples]
        records = [records[i] for i in order.tolist()]
        source += f"; {len(records):,} drawn at random with seed {seed}"
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
