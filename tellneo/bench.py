"""Benchmark harness shared by every suite in ``benchmarks/``.

A suite measures several implementations ("impls") of the same thing on the same inputs in one run and writes
one CSV (and a PNG beside it) with the columns the design fixes::

    suite, case, impl, device, dtype, shape, time_ms, peak_mb, ratio_time, ratio_mem, baseline_impl, commit, date

plus any extra columns a suite adds (fill rate, tokens/s, ...). ``time_ms`` is the median of ``repeat`` timed
calls after ``warmup`` calls; ``peak_mb`` is the peak CUDA memory allocated by the call (CUDA) or the growth of
the process's peak resident set during the first call (CPU). On CPU every (case, impl) runs in two fresh spawned
interpreters: one measures memory (with glibc told to return freed memory to the kernel — a fixed mmap threshold
and ``malloc_trim`` before the baseline — so that memory freed while building the inputs cannot be silently
reused and hide the call's own allocations), the other measures time with the allocator's default behaviour.

A measured callable is described by a :class:`Job`: an importable ``module:function`` that builds the inputs and
returns a zero-argument callable to time. Building happens before the memory baseline is taken.

Where this lives (a decision): the harness is a public, documented module of the installed package, and the
suites that use it are not. The suites (``benchmarks/bench_*.py``, ``benchmarks/methods``, ``benchmarks/gpu``)
compare tellneo with peers that are not runtime dependencies (Liger, PEFT, TRL, ...) and write into the
checkout's ``benchmarks/results/``, so they stay in the source tree; ``tellneo bench`` runs them and says that it
needs a checkout when it finds none. The suites import only the public names listed in ``__all__``
(tests/test_bench.py checks it); nothing here knows about ``benchmarks/`` but the default of :func:`results_dir`
and :func:`git_commit` not counting ``benchmarks/results`` as a change, and anyone may time their own ``Job``
with :func:`measure` on an installed tellneo.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tellneo.io import atomic_save_figure, atomic_write_csv

__all__ = [
    "COLUMNS",
    "Job",
    "Measurement",
    "Row",
    "add_ratios",
    "cpu_device_name",
    "device_name",
    "git_commit",
    "measure",
    "measure_here",
    "plot_ratios",
    "rel_error",
    "results_dir",
    "synchronize",
    "time_call",
    "write_csv",
]

#: The columns every suite's CSV starts with, in this order (DESIGN.md, "Benchmark results format").
COLUMNS = [
    "suite",
    "case",
    "impl",
    "device",
    "dtype",
    "shape",
    "time_ms",
    "peak_mb",
    "ratio_time",
    "ratio_mem",
    "baseline_impl",
    "commit",
    "date",
]


@dataclass(frozen=True)
class Job:
    """``module:function`` to call with ``kwargs``; it returns the zero-argument callable to measure.

    The builder may also return ``(callable, extra)`` where ``extra`` is a dict of columns for the CSV row.
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> tuple[Callable[[], Any], dict[str, Any]]:
        module_name, func_name = self.target.split(":")
        built = getattr(importlib.import_module(module_name), func_name)(**self.kwargs)
        if isinstance(built, tuple):
            return built[0], dict(built[1])
        return built, {}


@dataclass
class Measurement:
    """What :func:`measure` returns: median wall time of one call in ms, peak memory of one call in MiB (NaN when
    not measured) and the extra CSV columns the job's builder returned."""

    time_ms: float
    peak_mb: float
    extra: dict[str, Any]


def cpu_device_name() -> str:
    """The CPU's model name and this machine's core count, e.g. ``"Intel(R) Xeon(R) Processor (2 cores)"``."""
    from tellneo._info import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores)"


def device_name(device: str) -> str:
    """The real name of ``device`` for the CSV's ``device`` column: the CUDA device's name, else the CPU's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_device_name()


def git_commit(path: str | os.PathLike[str] | None = None) -> str:
    """Short commit of the git work tree holding ``path`` (default: this package's directory, i.e. the tellneo code
    being measured), with ``-dirty`` when tracked files outside ``benchmarks/results`` are modified; ``"unknown"``
    outside a git work tree (an installed wheel) or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=path or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # results written by earlier suites are not code: they do not make a measurement "dirty"
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results"],
            cwd=path or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rel_error(actual: Any, reference: Any) -> float:
    """||actual - reference|| / max(||reference||, tiny) of two tensors, computed in float64."""
    a, r = actual.detach().double(), reference.detach().double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def synchronize(device: str) -> None:
    """Wait for the queued CUDA work when ``device`` is a CUDA device (so a timer around a call sees all of it);
    nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call of ``fn`` in milliseconds, its queued CUDA work included (synchronised before and
    after on a CUDA ``device``)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def measure_here(job: Job, device: str, warmup: int, repeat: int, *, memory: bool = True,
                 timing: bool = True) -> Measurement:
    """Measure ``job`` in this process (used directly for CUDA, inside fresh children for CPU)."""
    fn, extra = job.build()
    synchronize(device)
    peak_mb = math.nan
    if memory and device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    elif memory:
        from tellneo.memory import reset_peak_rss, trim_heap

        trim_heap()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); CPU peak memory unavailable")
        before = _rss_kib("VmRSS")
        fn()
        peak_mb = max(0, _rss_kib("VmHWM") - before) / 1024
    if not timing:
        return Measurement(math.nan, peak_mb, extra)
    for _ in range(max(0, warmup - (1 if memory else 0))):
        fn()
    return Measurement(statistics.median(time_call(fn, device) for _ in range(repeat)), peak_mb, extra)


def _child(job: Job, device: str, warmup: int, repeat: int, threads: int | None, queue: Any, what: str) -> None:
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        queue.put(("ok", measure_here(job, device, warmup, repeat, memory=what == "memory", timing=what == "time")))
    except BaseException as exc:  # reported to the parent, which raises
        import traceback

        queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def measure(
    job: Job, device: str = "cpu", *, warmup: int = 2, repeat: int = 5, isolate: bool | None = None,
    threads: int | None = None, timeout_s: float = 1800,
) -> Measurement:
    """Median time and peak memory of ``job`` on ``device``; CPU jobs run in a fresh interpreter by default."""
    isolate = (not device.startswith("cuda")) if isolate is None else isolate
    if not isolate:
        return measure_here(job, device, warmup, repeat)
    mem = _run_child(job, device, warmup, repeat, threads, timeout_s, "memory")
    tim = _run_child(job, device, warmup, repeat, threads, timeout_s, "time")
    return Measurement(tim.time_ms, mem.peak_mb, tim.extra)


# glibc: a fixed mmap threshold turns off its dynamic threshold, so big blocks freed while the inputs were built
# go back to the kernel instead of being reused unseen by the measured call.
_MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _run_child(job: Job, device: str, warmup: int, repeat: int, threads: int | None, timeout_s: float,
               what: str) -> Measurement:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, device, warmup, repeat, threads, queue, what))
    saved = {k: os.environ.get(k) for k in _MEMORY_CHILD_ENV}
    if what == "memory":
        os.environ.update(_MEMORY_CHILD_ENV)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except Exception:  # queue.Empty: keep waiting while the child lives
                if not proc.is_alive():
                    try:  # the child may have reported just before exiting
                        status, payload = queue.get(timeout=1.0)
                        break
                    except Exception:
                        pass
                    raise RuntimeError(
                        f"benchmark job {job.target} {job.kwargs} died with exit code {proc.exitcode} "
                        "(-9 usually means the kernel's out-of-memory killer)"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"benchmark job {job.target} {job.kwargs} ran over {timeout_s} s") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"benchmark job {job.target} {job.kwargs} failed in its child process:\n{payload}")
    return payload


@dataclass
class Row:
    """One measured (case, impl) before ratios are added: the design's columns plus ``extra`` columns."""

    suite: str
    case: str
    impl: str
    device: str
    dtype: str
    shape: str
    time_ms: float
    peak_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


def add_ratios(rows: Sequence[Row], baseline_impl: str) -> list[dict[str, Any]]:
    """CSV dicts with ratio_time / ratio_mem against ``baseline_impl`` of the same case (NaN if absent)."""
    base = {r.case: r for r in rows if r.impl == baseline_impl}
    commit = git_commit()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for r in rows:
        b = base.get(r.case)
        ratio_time = r.time_ms / b.time_ms if b and b.time_ms > 0 else math.nan
        ratio_mem = r.peak_mb / b.peak_mb if b and b.peak_mb > 0 else math.nan
        d = {
            "suite": r.suite,
            "case": r.case,
            "impl": r.impl,
            "device": r.device,
            "dtype": r.dtype,
            "shape": r.shape,
            "time_ms": round(r.time_ms, 4),
            "peak_mb": round(r.peak_mb, 3),
            "ratio_time": round(ratio_time, 4) if not math.isnan(ratio_time) else "nan",
            "ratio_mem": round(ratio_mem, 4) if not math.isnan(ratio_mem) else "nan",
            "baseline_impl": baseline_impl,
            "commit": commit,
            "date": date,
        }
        d.update(r.extra)
        out.append(d)
    return out


def write_csv(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write ``records`` (from :func:`add_ratios`) atomically to ``path``, :data:`COLUMNS` first; returns ``path``."""
    return atomic_write_csv(path, records, first_columns=COLUMNS)


def plot_ratios(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Grouped bars per case: absolute time and peak memory per impl, with the ratio to the baseline on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lookup = {(r["case"], r["impl"]): r for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases) * len(impls) / 2 + 4), 4.8))
    width = 0.8 / max(1, len(impls))
    for ax, metric, ratio_key, label in (
        (axes[0], "time_ms", "ratio_time", "time (ms, median)"),
        (axes[1], "peak_mb", "ratio_mem", "peak memory (MB)"),
    ):
        for i, impl in enumerate(impls):
            xs, ys, ratios = [], [], []
            for c, case in enumerate(cases):
                r = lookup.get((case, impl))
                if r is None:
                    continue
                xs.append(c + (i - (len(impls) - 1) / 2) * width)
                ys.append(float(r[metric]))
                ratios.append(r[ratio_key])
            bars = ax.bar(xs, ys, width, label=impl)
            for bar, ratio in zip(bars, ratios):
                if ratio not in ("nan", None) and not (isinstance(ratio, float) and math.isnan(ratio)):
                    ax.annotate(f"{float(ratio):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    device = records[0]["device"] if records else ""
    baseline = records[0]["baseline_impl"] if records else ""
    fig.suptitle(f"{title}\n{device} — ratios vs {baseline}", fontsize=10)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def results_dir(device: str, root: Path | None = None) -> Path:
    """``root`` (CPU) or ``root/gpu`` (CUDA); ``root`` defaults to ``./benchmarks/results`` of the current
    directory (the suites pass their checkout's ``benchmarks.RESULTS``, so they write there from anywhere)."""
    base = root if root is not None else Path.cwd() / "benchmarks" / "results"
    return base / "gpu" if device.startswith("cuda") else base
