"""The benchmark harness measures what it says: peak memory of the call itself, median time, clear failures."""

from __future__ import annotations

import math

import pytest

from tellneo.bench import Job, Row, add_ratios, measure


def test_cpu_peak_memory_sees_the_call_even_after_input_churn():
    m = measure(Job("tests.bench_jobs:allocate", {"mb": 64, "churn_mb": 128}), "cpu", warmup=1, repeat=2)
    assert 60 <= m.peak_mb <= 80, m.peak_mb
    assert m.time_ms > 0 and m.extra == {"mb": 64}


def test_dead_child_is_reported():
    with pytest.raises(RuntimeError, match="died with exit code 3"):
        measure(Job("tests.bench_jobs:crash"), "cpu", warmup=1, repeat=1)


def test_ratios_against_baseline():
    rows = [Row("s", "c", "a", "cpu", "fp32", "x", 10.0, 100.0), Row("s", "c", "b", "cpu", "fp32", "x", 5.0, 25.0)]
    recs = {r["impl"]: r for r in add_ratios(rows, "a")}
    assert recs["b"]["ratio_time"] == 0.5 and recs["b"]["ratio_mem"] == 0.25 and recs["a"]["ratio_time"] == 1.0
    only_b = add_ratios(rows[1:], "a")[0]
    assert only_b["ratio_time"] == "nan" and not math.isnan(float(only_b["time_ms"]))
