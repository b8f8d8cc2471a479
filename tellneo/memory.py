"""Peak memory of one phase of a run (e.g. the training loop), not of the whole process.

``ru_maxrss`` and ``torch.cuda.max_memory_allocated()`` read at the end of a run include model loading, data
preparation and everything else before training. :class:`TrainingMemory` is entered once the models are loaded;
on exit its :attr:`~TrainingMemory.result` is the peak of the phase above the memory in use at entry:

>>> import torch
>>> with TrainingMemory(device="cpu") as meter:
...     x = torch.ones(1024, 1024)  # 4 MiB
...     del x
>>> meter.result.method in ("rss_vmhwm", "rss_vmhwm_unreset", "rss_sampled")
True
>>> sorted(meter.result.to_dict(prefix="train_"))[:3]
['train_baseline_mb', 'train_device', 'train_duration_s']

What is measured:

* **CUDA** (``method="cuda_max_memory_allocated"``): ``torch.cuda.reset_peak_memory_stats()`` at entry, then
  ``max_memory_allocated() - memory_allocated()@entry`` (tensors allocated by PyTorch's caching allocator on that
  device) and the same for ``reserved`` (what the allocator holds from the driver). Memory outside the caching
  allocator (cuBLAS workspaces, NCCL buffers, the CUDA context) is not counted.
* **CPU**: growth of the process's resident set (RSS) over the RSS at entry, from two sources, of which the larger
  is reported:

  - the kernel's RSS high-water mark ``VmHWM`` (``/proc/self/status``). Linux cannot reset ``ru_maxrss`` directly,
    but writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (``method="rss_vmhwm"``;
    exact up to the kernel's lazily synchronised per-thread RSS counters, a few pages). Side effect: it also resets
    this process's ``ru_maxrss`` and any other reader's ``VmHWM`` (the whole-process peak before entry is kept in
    :attr:`PhaseMemory.process_peak_before_mb`). Where the write is refused, ``VmHWM`` still counts when it rose
    above its value at entry, because it was then set during the phase (``method="rss_vmhwm_unreset"``);
  - a background thread sampling the RSS (``/proc/self/statm``, else ``psutil`` if installed) every
    ``interval_s`` (10 ms) (``method="rss_sampled"`` when it is the only source). A sampler can miss peaks shorter
    than its interval.

  RSS counts every page of the process: tensors, but also the allocator's retained free memory, Python objects,
  libraries loaded during the phase, and thread stacks. At entry the meter runs ``gc.collect()`` and glibc's
  ``malloc_trim(0)`` (``trim=True``) so that heap memory freed before the phase is returned to the system and
  its reuse counts as growth.

Nested CPU meters do not reset ``VmHWM`` while an outer one is active (that would corrupt the outer reading); the
inner one then uses the unreset high-water mark and its sampler.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

__all__ = ["PhaseMemory", "TrainingMemory", "reset_peak_rss", "trim_heap"]

_MIB = 2**20
_active_cpu_meters = 0
_active_lock = threading.Lock()


@dataclass(frozen=True)
class PhaseMemory:
    """Peak memory of one phase, in MiB above the memory in use when the phase began.

    ``peak_mb`` is the number to report; ``method`` says where it comes from (see the module docstring):
    ``"cuda_max_memory_allocated"``, ``"rss_vmhwm"``, ``"rss_vmhwm_unreset"`` or ``"rss_sampled"``.
    """

    peak_mb: float
    method: str
    device: str
    baseline_mb: float  # allocated CUDA memory / process RSS at entry
    duration_s: float
    peak_reserved_mb: float | None = None  # CUDA: max_memory_reserved() - memory_reserved()@entry
    hwm_peak_mb: float | None = None  # CPU: VmHWM@exit - RSS@entry, when VmHWM is valid for the phase
    sampled_peak_mb: float | None = None  # CPU: the sampler's highest RSS - RSS@entry
    samples: int = 0
    interval_s: float | None = None
    process_peak_before_mb: float | None = None  # the whole-process peak up to entry, which the reset hides:
    # CPU: VmHWM at entry; CUDA: max_memory_allocated() at entry

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        """JSON-ready fields (floats rounded to 0.1 MiB), each key prefixed with ``prefix``."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and key != "interval_s":
                value = round(value, 1) if math.isfinite(value) else None
            out[prefix + key] = value
        return out


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_reader() -> Callable[[], int] | None:
    """A cheap function returning the current RSS in bytes (None if this platform offers none)."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        os.close(fd)

        def statm() -> int:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * page

        return statm
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    return lambda: process.memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM, and with it ``ru_maxrss``) by writing 5 to
    ``/proc/self/clear_refs``; False where the kernel refuses (then the mark keeps the earlier peak)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS measured next
    starts from what is really in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_reset_hwm = reset_peak_rss  # the meter calls it by this name (tests replace it)


class _Sampler(threading.Thread):
    def __init__(self, read: Callable[[], int], interval_s: float) -> None:
        super().__init__(name="tellneo-memory-sampler", daemon=True)
        self.read, self.interval_s = read, interval_s
        self.peak, self.samples = read(), 1
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        try:
            rss = self.read()
        except OSError:
            return
        self.peak, self.samples = max(self.peak, rss), self.samples + 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


class TrainingMemory:
    """Context manager measuring the peak memory of the enclosed phase (see the module docstring for the method).

    Args:
        device: ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or ``"cpu"``; ``None`` = ``"cuda"`` when CUDA is
            available, else ``"cpu"``. Pass the device the training runs on.
        interval_s: CPU sampler period in seconds (> 0).
        trim: CPU only: ``gc.collect()`` + ``malloc_trim(0)`` at entry (see the module docstring).

    After the ``with`` block, :attr:`result` is a :class:`PhaseMemory`. A meter can be entered again (a new
    measurement); it is not reentrant.
    """

    def __init__(self, device: Any = None, *, interval_s: float = 0.01, trim: bool = True) -> None:
        import torch

        if not (isinstance(interval_s, (int, float)) and interval_s > 0):
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        self.interval_s, self.trim = float(interval_s), trim
        self._result: PhaseMemory | None = None
        self._state: dict[str, Any] | None = None

    @property
    def result(self) -> PhaseMemory:
        """The measurement of the last completed ``with`` block."""
        if self._result is None:
            raise RuntimeError("TrainingMemory.result is available after the `with` block has exited")
        return self._result

    def __enter__(self) -> TrainingMemory:
        if self._state is not None:
            raise RuntimeError("TrainingMemory is already active (not reentrant); use a second meter to nest")
        self._enter_cuda() if self.device.type == "cuda" else self._enter_cpu()
        self._state["t0"] = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        state, self._state = self._state, None
        duration = time.perf_counter() - state["t0"]
        if self.device.type == "cuda":
            self._result = self._exit_cuda(state, duration)
        else:
            self._result = self._exit_cpu(state, duration)

    # -- CUDA ---------------------------------------------------------------------------------------------------
    def _enter_cuda(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        peak_before = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._state = {"peak_before": peak_before, "allocated": torch.cuda.memory_allocated(self.device),
                       "reserved": torch.cuda.memory_reserved(self.device)}

    def _exit_cuda(self, state: dict[str, Any], duration: float) -> PhaseMemory:
        import torch

        torch.cuda.synchronize(self.device)
        peak = (torch.cuda.max_memory_allocated(self.device) - state["allocated"]) / _MIB
        reserved = (torch.cuda.max_memory_reserved(self.device) - state["reserved"]) / _MIB
        return PhaseMemory(peak_mb=max(0.0, peak), method="cuda_max_memory_allocated", device=str(self.device),
                           baseline_mb=state["allocated"] / _MIB, duration_s=duration,
                           peak_reserved_mb=max(0.0, reserved), process_peak_before_mb=state["peak_before"] / _MIB)

    # -- CPU ----------------------------------------------------------------------------------------------------
    def _enter_cpu(self) -> None:
        global _active_cpu_meters
        read = _rss_reader()
        if read is None:
            raise RuntimeError("TrainingMemory: no way to read this process's RSS (/proc/self/statm or psutil)")
        if self.trim:
            trim_heap()
        hwm_before = _status_kib("VmHWM")
        with _active_lock:
            reset = _active_cpu_meters == 0 and hwm_before is not None and _reset_hwm()
            _active_cpu_meters += 1
        baseline = read()
        sampler = _Sampler(read, self.interval_s)
        sampler.start()
        self._state = {"baseline": baseline, "reset": reset, "sampler": sampler,
                       "hwm_entry": _status_kib("VmHWM"), "hwm_before": hwm_before}

    def _exit_cpu(self, state: dict[str, Any], duration: float) -> PhaseMemory:
        global _active_cpu_meters
        sampler: _Sampler = state["sampler"]
        sampler.stop()
        hwm_exit = _status_kib("VmHWM")
        with _active_lock:
            _active_cpu_meters -= 1
        baseline = state["baseline"]
        sampled = max(0.0, (sampler.peak - baseline) / _MIB)
        hwm_peak, method = None, "rss_sampled"
        if hwm_exit is not None and state["hwm_entry"] is not None:
            if state["reset"]:
                method = "rss_vmhwm"
            elif hwm_exit > state["hwm_entry"]:  # the process high-water mark was set during the phase
                method = "rss_vmhwm_unreset"
            if method != "rss_sampled":
                hwm_peak = max(0.0, (hwm_exit * 1024 - baseline) / _MIB)
        peak = max(sampled, hwm_peak or 0.0)
        before = state["hwm_before"]
        return PhaseMemory(peak_mb=peak, method=method, device="cpu", baseline_mb=baseline / _MIB,
                           duration_s=duration, hwm_peak_mb=hwm_peak, sampled_peak_mb=sampled,
                           samples=sampler.samples, interval_s=self.interval_s,
                           process_peak_before_mb=None if before is None else before / 1024)
