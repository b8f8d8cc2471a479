"""Jobs for tests/test_bench.py (importable by the harness's spawned children)."""

from __future__ import annotations

import numpy as np


def allocate(mb: int, churn_mb: int = 0):
    if churn_mb:  # freed before the measurement: must not hide the measured allocation
        junk = np.ones(churn_mb * 2**20 // 8)
        del junk

    def run():
        a = np.ones(mb * 2**20 // 8)
        return float(a[-1])

    return run, {"mb": mb}


def crash():
    import os

    def run():
        os._exit(3)

    return run
