"""tellneo.memory.TrainingMemory: peak memory of one phase, not of the process (CPU RSS here; CUDA on a GPU)."""

from __future__ import annotations

import doctest
import json
import time

import pytest
import torch

import tellneo.memory as memory
from tellneo.memory import PhaseMemory, TrainingMemory

MB = 200


def touch(mb: int = MB, device: str = "cpu") -> torch.Tensor:
    """``mb`` MiB of float32, every page written (``torch.empty`` would not be resident)."""
    return torch.ones(mb * 2**20 // 4, device=device)


def test_allocation_inside_the_phase_is_counted_even_when_freed_at_once():
    with TrainingMemory(device="cpu") as meter:
        x = touch()
        del x  # a peak far shorter than the sampler's 10 ms: the kernel's high-water mark still has it
    result = meter.result
    assert isinstance(result, PhaseMemory) and result.device == "cpu"
    assert result.method == "rss_vmhwm", "this Linux accepts /proc/self/clear_refs"
    assert result.peak_mb >= MB - 10 and result.hwm_peak_mb >= MB - 10
    assert result.peak_mb < MB + 60
    assert result.baseline_mb > 0 and result.process_peak_before_mb > 0 and result.samples >= 2


def test_allocation_before_the_phase_is_not_counted():
    before = touch()
    with TrainingMemory(device="cpu") as meter:
        before.add_(1)  # in use during the phase, but already resident at entry
    assert meter.result.peak_mb < 30, meter.result
    assert meter.result.baseline_mb >= MB
    del before


def test_an_empty_phase_reports_about_zero():
    x = touch()
    del x  # a high process peak before entry must not leak into the phase
    with TrainingMemory(device="cpu") as meter:
        pass
    assert meter.result.peak_mb < 30 and meter.result.method == "rss_vmhwm", meter.result


def test_sampler_alone_sees_a_held_allocation(monkeypatch):
    """Without /proc/self/status (no VmHWM) the sampler is the only source: it sees a peak held for > interval."""
    monkeypatch.setattr(memory, "_status_kib", lambda field_name: None)
    with TrainingMemory(device="cpu", interval_s=0.005) as meter:
        x = touch()
        time.sleep(0.1)
        del x
    result = meter.result
    assert result.method == "rss_sampled" and result.hwm_peak_mb is None
    assert result.peak_mb == result.sampled_peak_mb >= MB - 10 and result.samples >= 5


def test_unresettable_high_water_mark_counts_only_when_it_rose_in_the_phase(monkeypatch):
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    x = touch()
    del x  # process peak now about MB above the RSS: a smaller phase peak is below it
    with TrainingMemory(device="cpu", interval_s=0.005) as meter:
        y = touch(50)
        time.sleep(0.05)
        del y
    assert meter.result.method == "rss_sampled" and meter.result.hwm_peak_mb is None
    assert 40 <= meter.result.peak_mb < 80
    with open("/proc/self/clear_refs", "w") as f:  # the process peak is now the current RSS
        f.write("5")
    with TrainingMemory(device="cpu") as meter:
        y = touch()
        del y
    assert meter.result.method == "rss_vmhwm_unreset" and meter.result.peak_mb >= MB - 10


def test_nested_meters_do_not_reset_the_outer_high_water_mark():
    with TrainingMemory(device="cpu") as outer:
        with TrainingMemory(device="cpu") as inner:
            x = touch()
            del x
        with TrainingMemory(device="cpu") as after:
            pass
    assert outer.result.method == "rss_vmhwm" and outer.result.peak_mb >= MB - 10
    assert inner.result.method == "rss_vmhwm_unreset" and inner.result.peak_mb >= MB - 10
    assert after.result.method == "rss_sampled" and after.result.peak_mb < 30  # VmHWM was set before it began
    with TrainingMemory(device="cpu") as alone:  # no meter active any more: resets again
        pass
    assert alone.result.method == "rss_vmhwm"


def test_to_dict_is_json_ready_and_prefixed():
    with TrainingMemory(device="cpu") as meter:
        x = touch(20)
        del x
    d = meter.result.to_dict(prefix="train_")
    assert json.loads(json.dumps(d)) == d
    assert d["train_method"] == "rss_vmhwm" and d["train_peak_mb"] == round(meter.result.peak_mb, 1)
    assert d["train_peak_reserved_mb"] is None and d["train_interval_s"] == 0.01
    assert set(meter.result.to_dict()) == {k.removeprefix("train_") for k in d}


def test_meter_can_be_reused_but_not_reentered():
    meter = TrainingMemory(device="cpu")
    with pytest.raises(RuntimeError, match="after the `with` block"):
        meter.result
    with meter:
        with pytest.raises(RuntimeError, match="not reentrant"):
            meter.__enter__()
    first = meter.result
    with meter:
        x = touch(50)
        del x
    assert meter.result is not first and meter.result.peak_mb >= 40


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval_s=0), "interval_s"),
    (dict(interval_s="fast"), "interval_s"),
    (dict(device="meta"), "CPU or CUDA"),
    (dict(device="gpu0"), "device must be"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingMemory(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainingMemory(device="cuda")


def test_module_docstring_example_runs():
    failures, tried = doctest.testmod(memory, raise_on_error=False, verbose=False)
    assert tried >= 3 and failures == 0


@pytest.mark.gpu
def test_cuda_phase_peak_excludes_memory_allocated_before():
    before = touch(device="cuda")
    with TrainingMemory(device="cuda") as meter:
        x = touch(device="cuda")
        del x
    result = meter.result
    assert result.method == "cuda_max_memory_allocated" and result.device.startswith("cuda")
    assert MB <= result.peak_mb < MB + 1 and result.peak_reserved_mb >= 0
    assert result.baseline_mb >= MB
    with TrainingMemory(device="cuda") as meter:
        before.add_(1)
    assert meter.result.peak_mb < 1
    del before
