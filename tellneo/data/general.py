"""Named general-data pools that need no file: what ``--general NAME`` (and ``general_records``) accept.

* ``python-docs`` — instruction pairs from Python's own documentation (:mod:`tellneo.data.corpora`, PSF
  license; the default);
* ``synthetic`` — :data:`~tellneo.data.synthetic_general.SYNTHETIC_POOL_SIZE` generated instruction/answer
  pairs (:mod:`tellneo.data.synthetic_general`, seed 0);
* ``mixed`` — both pools, interleaved by a fixed seeded shuffle (so any prefix or random draw holds both in
  proportion to their sizes).

Each pool is a fixed list (its fingerprint identifies it); which records a run uses is the caller's draw.
"""

from __future__ import annotations

import functools
import random

__all__ = ["GENERAL_SOURCES", "DEFAULT_GENERAL", "named_general_pool"]

GENERAL_SOURCES = ("python-docs", "synthetic", "mixed")
DEFAULT_GENERAL = "python-docs"
_MIX_SEED = "general-mixed:0"


@functools.lru_cache(maxsize=None)
def _pool(name: str) -> tuple[dict[str, str], ...]:
    from tellneo.data.corpora import python_docs_pairs
    from tellneo.data.synthetic_general import SYNTHETIC_POOL_SIZE, synthetic_pairs

    if name == "python-docs":
        return tuple(python_docs_pairs())
    if name == "synthetic":
        return tuple(synthetic_pairs(SYNTHETIC_POOL_SIZE, seed=0))
    mixed = [*_pool("python-docs"), *_pool("synthetic")]
    random.Random(_MIX_SEED).shuffle(mixed)
    return tuple(mixed)


def named_general_pool(name: str) -> tuple[list[dict[str, str]], str]:
    """``(records, description)`` of the named pool (a fresh list of fresh dicts: callers may mutate them).
    Raises ValueError naming the known names for any other ``name``."""
    if name not in GENERAL_SOURCES:
        raise ValueError(f"unknown general source {name!r}; named sources: {', '.join(GENERAL_SOURCES)}")
    from tellneo.data.synthetic_general import SYNTHETIC_POOL_SIZE

    records = [dict(r) for r in _pool(name)]
    what = {"python-docs": "python-docs pairs (PSF license)",
            "synthetic": f"synthetic pairs (tellneo generator, {SYNTHETIC_POOL_SIZE:,}-pair pool, seed 0)",
            "mixed": f"mixed python-docs + synthetic pairs ({len(_pool('python-docs')):,} + "
                     f"{len(_pool('synthetic')):,}, interleaved)"}[name]
    return records, what
