"""Summary fields of the training-phase memory meter and the whole-process peak kept honest around it."""

from __future__ import annotations

from tellneo.memory import PhaseMemory
from tellneo.recipes.reporting import process_peak, train_memory_fields


def _cpu(peak=12.34, before=900.0):
    return PhaseMemory(peak_mb=peak, method="rss_vmhwm", device="cpu", baseline_mb=500.04, duration_s=1.0,
                       hwm_peak_mb=peak, sampled_peak_mb=peak - 1, samples=3, interval_s=0.01,
                       process_peak_before_mb=before)


def test_fields_of_a_cpu_and_a_cuda_phase_and_of_no_phase():
    assert train_memory_fields(_cpu()) == {"train_peak_mb": 12.3, "train_peak_method": "rss_vmhwm",
                                           "train_peak_reserved_mb": None, "train_baseline_mb": 500.0}
    cuda = PhaseMemory(peak_mb=100.0, method="cuda_max_memory_allocated", device="cuda:0", baseline_mb=50.0,
                       duration_s=1.0, peak_reserved_mb=128.0)
    assert train_memory_fields(cuda)["train_peak_reserved_mb"] == 128.0
    assert set(train_memory_fields(None).values()) == {None}


def test_process_peak_is_the_max_of_the_reading_after_the_reset_and_the_peak_before():
    machine = {"peak_rss_mb": 700.0, "device": "cpu"}
    assert process_peak(machine, _cpu(before=900.0))["peak_rss_mb"] == 900.0  # the reset hid the earlier peak
    assert process_peak(machine, _cpu(before=650.0))["peak_rss_mb"] == 700.0  # training set the peak
    assert machine["peak_rss_mb"] == 700.0  # not modified in place
    assert process_peak(machine, None) == machine
    gpu = {"peak_rss_mb": 700.0, "peak_cuda_allocated_mb": 10.0}
    assert process_peak(gpu, None, cuda_peak_before_mb=30.0)["peak_cuda_allocated_mb"] == 30.0


def test_process_peak_takes_the_cuda_meters_peak_before_for_the_allocator_not_for_rss():
    from tellneo.memory import PhaseMemory

    cuda = PhaseMemory(peak_mb=5.0, method="cuda_max_memory_allocated", device="cuda:0", baseline_mb=1.0,
                       duration_s=1.0, process_peak_before_mb=30.0)
    gpu = {"peak_rss_mb": 700.0, "peak_cuda_allocated_mb": 10.0}
    assert process_peak(gpu, cuda) == {"peak_rss_mb": 700.0, "peak_cuda_allocated_mb": 30.0}
