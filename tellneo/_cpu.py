"""How busy this machine's CPUs are right now, for the automatic torch thread count.

The 1-minute load average trails by a minute: right after ``scripts/setup-venv.sh`` (a compile and a pip install)
it still reports two busy cores on an idle 2-core machine, and a run started then chose 1 thread of 2. Instead,
:func:`busy_cores` samples ``/proc/stat`` twice, a fraction of a second apart, and counts the CPU time spent by
other work in between (this process sleeps while it measures, so it does not count itself).
"""

from __future__ import annotations

import os
import time

__all__ = ["allowed_cores", "auto_threads", "busy_cores"]


def allowed_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity mask; all CPUs where there is no such notion)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """``{cpu id: (busy ticks, total ticks)}`` from ``/proc/stat`` (idle and iowait are not busy; guest time is
    already inside user time, so it is not added again)."""
    times: dict[int, tuple[int, int]] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_cores(interval: float = 0.25, *, path: str = "/proc/stat") -> float | None:
    """Cores' worth of CPU time used during the next ``interval`` seconds by everything else on the CPUs this
    process may use (0.0 = idle, 2.0 = two cores fully busy). None where ``/proc/stat`` cannot be read (not Linux).
    """
    try:
        first = _cpu_times(path)
        time.sleep(interval)
        second = _cpu_times(path)
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu in allowed_cores():
        if cpu in first and cpu in second:
            d_busy, d_total = second[cpu][0] - first[cpu][0], second[cpu][1] - first[cpu][1]
            if d_total > 0:
                busy += min(1.0, max(0.0, d_busy / d_total))
    return round(busy, 2)


def auto_threads(max_threads: int, interval: float = 0.25) -> tuple[int, float | None]:
    """``(threads, busy cores)``: every allowed core that is idle now, at least 1 and at most ``max_threads``.

    Where ``/proc/stat`` is missing, the 1-minute load average stands in for the busy cores (it trails, see the
    module docstring), and with neither every core is taken.
    """
    cores = len(allowed_cores())
    busy = busy_cores(interval)
    measured = busy
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(max_threads, cores - int(busy + 0.5))), measured
