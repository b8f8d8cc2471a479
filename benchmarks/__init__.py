"""Benchmark suites of a tellneo checkout (not installed with the package); the harness is :mod:`tellneo.bench`.

This module holds what the suites' command lines share: the results folder of this checkout, the flags every
suite has, and writing a suite's CSV + PNG pair.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: ``benchmarks/results`` of this checkout: where the suites write their CSV + PNG files unless given ``--out``.
RESULTS = Path(__file__).resolve().parent / "results"


def add_out_flag(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: the results root (CUDA runs write under its ``gpu/``), default :data:`RESULTS`."""
    parser.add_argument("--out", type=Path, default=None,
                        help="results root (default: this checkout's benchmarks/results; CUDA runs write under "
                             "its gpu/ folder)")


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads in each measuring process (``measure(..., threads=)``)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in each measuring process (default: torch's default)")


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Exit through ``parser.error`` when ``--device`` asks for CUDA and no CUDA device is visible."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is visible")


def write_results(records: Sequence[dict[str, Any]], device: str, out: Path | None, stem: str, title: str) -> Path:
    """Write ``records`` (from ``tellneo.bench.add_ratios``) as ``<stem>.csv`` and its plot ``<stem>.png`` into
    ``tellneo.bench.results_dir(device, out or RESULTS)``, print where, and return the CSV's path."""
    from tellneo.bench import plot_ratios, results_dir, write_csv

    csv_path = write_csv(records, results_dir(device, out or RESULTS) / f"{stem}.csv")
    plot_ratios(records, csv_path.with_suffix(".png"), title)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}", flush=True)
    return csv_path
