"""`tellneo info` on a machine without a GPU says so, instead of repeating the CUDA runtime's driver error."""

from __future__ import annotations

import pytest

import tellneo._ext as ext


class _FakeNative:
    def build_info(self):
        return {"cuda": True}

    def cuda_device_count(self):
        return -1, "CUDA driver version is insufficient for CUDA runtime version"


@pytest.mark.parametrize("driver, expected", [(False, "no GPU (no NVIDIA driver or device on this machine)"),
                                              (True, "the CUDA runtime in tellneo._C cannot start: CUDA driver "
                                                     "version is insufficient for CUDA runtime version")])
def test_cuda_status_without_a_gpu(monkeypatch, driver, expected):
    monkeypatch.setattr(ext, "_load", lambda: _FakeNative())
    monkeypatch.setattr(ext, "native", lambda: _FakeNative())
    monkeypatch.setattr(ext, "_nvidia_driver_present", lambda: driver)
    assert ext.native_cuda_status.__wrapped__() == (False, expected)
