"""pytest-benchmark view of the mixer hot paths (regression tracking; the CSV/PNG suite is bench_mixer.py).

    python -m pytest benchmarks/test_mixer_pytest_benchmark.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_mixer import SEQ_LEN, lognormal_lengths, random_store
from tellneo.data import emit_rows, plan


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "wrap"])
def test_plan_200k(benchmark, strategy):
    lengths = lognormal_lengths(200_000)
    p = benchmark(plan, lengths, SEQ_LEN, strategy=strategy)
    assert p.num_tokens == lengths.sum() and p.fill_rate > 0.99


def test_emit_64_rows(benchmark):
    store = random_store(20_000)
    p = plan(store.lengths, SEQ_LEN)
    out = benchmark(emit_rows, store, p, np.arange(64))
    assert out["input_ids"].shape == (64, SEQ_LEN)
