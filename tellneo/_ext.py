"""Loading of the native extension ``tellneo._C``, with an error that says how to fix a missing build."""

from __future__ import annotations

import functools
from types import ModuleType


class NativeExtensionError(ImportError):
    """tellneo._C is missing or cannot be loaded."""


@functools.lru_cache(maxsize=None)
def _load() -> ModuleType | Exception:
    try:
        from tellneo import _C

        return _C
    except ImportError as exc:
        return exc


def native() -> ModuleType:
    """The ``tellneo._C`` module; raises :class:`NativeExtensionError` with build instructions if absent."""
    loaded = _load()
    if isinstance(loaded, Exception):
        raise NativeExtensionError(
            "tellneo's C++ extension (tellneo._C) is not available: "
            f"{loaded}. Reinstall with `pip install .` (or `pip install -e .`) from the repository so that "
            "CMake builds it, or pass backend='torch' to use the pure-PyTorch reference."
        ) from loaded
    return loaded


def has_native() -> bool:
    return not isinstance(_load(), Exception)


def native_cuda_compiled() -> bool:
    return has_native() and bool(native().build_info()["cuda"])


def _nvidia_driver_present() -> bool:
    """Whether the NVIDIA kernel driver is loaded (Linux: /proc/driver/nvidia or /dev/nvidia* device nodes).
    Without it the CUDA runtime reports "driver version is insufficient", which on a machine with no GPU means
    only that there is no GPU."""
    import glob
    import os

    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


@functools.lru_cache(maxsize=None)
def native_cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether the CUDA emit kernels were compiled in and the CUDA runtime starts."""
    if not has_native():
        return False, "tellneo._C is not built"
    if not native_cuda_compiled():
        return False, "tellneo._C was built without CUDA (no nvcc at build time, or TELLNEO_CUDA=0)"
    count, error = native().cuda_device_count()
    if count < 0 and not _nvidia_driver_present():
        return False, "no GPU (no NVIDIA driver or device on this machine)"
    if count < 0:
        return False, f"the CUDA runtime in tellneo._C cannot start: {error}"
    if count == 0:
        return False, "no CUDA device is visible"
    return True, ""
