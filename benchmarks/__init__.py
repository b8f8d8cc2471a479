"""Benchmark suites of a tellneo checkout (not installed with the package); the harness is :mod:`tellneo.bench`."""

from pathlib import Path

#: ``benchmarks/results`` of this checkout: where the suites write their CSV + PNG files unless given ``--out``.
RESULTS = Path(__file__).resolve().parent / "results"
