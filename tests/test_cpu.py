"""Automatic thread count: measured from CPU time now, not from the trailing load average (issue 18)."""

from __future__ import annotations

import os
import sys

import pytest

from tellneo import _cpu

STAT = """cpu  {u} 0 {s} {i} 0 0 0 0 0 0
cpu0 {u0} 0 {s0} {i0} {w0} 0 0 0 7 0
cpu1 {u1} 0 0 {i1} 0 0 0 0 0 0
intr 12345
"""


def test_cpu_times_parse_busy_and_total(tmp_path):
    path = tmp_path / "stat"
    path.write_text(STAT.format(u=0, s=0, i=0, u0=100, s0=20, i0=300, w0=5, u1=50, i1=10))
    times = _cpu._cpu_times(str(path))
    assert times == {0: (120, 425), 1: (50, 60)}  # guest (7) is inside user already; iowait counts as idle


def test_busy_cores_counts_the_time_others_used_in_between(tmp_path, monkeypatch):
    readings = iter([{0: (100, 1000), 1: (500, 1000)}, {0: (125, 1100), 1: (590, 1100)}])
    monkeypatch.setattr(_cpu, "_cpu_times", lambda path: next(readings))
    monkeypatch.setattr(_cpu, "allowed_cores", lambda: [0, 1])
    assert _cpu.busy_cores(0.0) == pytest.approx(0.25 + 0.9)


def test_busy_cores_only_counts_the_cpus_this_process_may_use(monkeypatch):
    readings = iter([{0: (0, 100), 1: (0, 100)}, {0: (100, 200), 1: (0, 200)}])
    monkeypatch.setattr(_cpu, "_cpu_times", lambda path: next(readings))
    monkeypatch.setattr(_cpu, "allowed_cores", lambda: [1])
    assert _cpu.busy_cores(0.0) == 0.0


@pytest.mark.parametrize("busy, cores, max_threads, expected", [
    (0.1, 2, 2, 2),     # idle now: every core, whatever the load average says
    (0.6, 2, 2, 1),     # one core taken
    (1.9, 2, 2, 1),     # at least one thread
    (0.0, 16, 4, 4),    # never more than asked for
    (3.4, 8, 8, 5),
])
def test_auto_threads_uses_the_measured_busy_cores(monkeypatch, busy, cores, max_threads, expected):
    monkeypatch.setattr(_cpu, "busy_cores", lambda interval=0.25: busy)
    monkeypatch.setattr(_cpu, "allowed_cores", lambda: list(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # just raised by scripts/setup-venv.sh
    assert _cpu.auto_threads(max_threads) == (expected, busy)


def test_without_proc_stat_the_load_average_stands_in(monkeypatch):
    monkeypatch.setattr(_cpu, "busy_cores", lambda interval=0.25: None)
    monkeypatch.setattr(_cpu, "allowed_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert _cpu.auto_threads(4) == (3, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux only")
def test_busy_cores_on_this_machine_is_a_plausible_number():
    busy = _cpu.busy_cores(0.1)
    assert busy is not None and 0.0 <= busy <= len(_cpu.allowed_cores())


def test_machine_state_records_threads_and_busy_cores():
    import torch

    from tellneo.recipes.reporting import machine_state

    state = machine_state()
    assert state["torch_threads"] == torch.get_num_threads()
    assert "busy_cores" in state and (state["busy_cores"] is None or state["busy_cores"] >= 0)
