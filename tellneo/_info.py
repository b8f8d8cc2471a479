"""What ``tellneo info`` prints: versions, backends and build flags."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from tellneo import __version__
from tellneo._backend import triton_interpreter_enabled
from tellneo._ext import has_native, native, native_cuda_status


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model as the kernel reports it (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_dict() -> dict[str, Any]:
    import torch

    versions = {"tellneo": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "triton", "transformers", "peft", "accelerate", "datasets"):
        versions[dist] = _version(dist)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    cuda_ok, cuda_reason = native_cuda_status()
    backends = {
        "cpp": {"available": has_native(), "detail": "" if has_native() else "tellneo._C not built"},
        "cuda": {"available": cuda_ok, "detail": cuda_reason},
        "triton": {
            "available": versions["triton"] is not None and bool(gpus),
            "detail": "" if gpus else ("triton not installed" if versions["triton"] is None else "no CUDA device"),
        },
        "triton_interpreter": {
            "available": versions["triton"] is not None and triton_interpreter_enabled(),
            "detail": "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slow; for tests)",
        },
        "torch": {"available": True, "detail": "PyTorch reference implementations"},
    }
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "backends": backends,
        "build": native().build_info() if has_native() else None,
    }


def info_text() -> str:
    d = info_dict()
    lines = ["tellneo " + d["versions"]["tellneo"], "", "versions:"]
    lines += [f"  {k:<13}{v if v is not None else '(not installed)'}" for k, v in d["versions"].items() if k != "tellneo"]
    lines += ["", f"platform:      {d['platform']}", f"cpu:           {d['cpu']}"]
    lines += [f"torch CUDA:    {d['torch_cuda'] or '(CPU build)'}", f"GPUs:          {', '.join(d['gpus']) or 'none'}"]
    lines += ["", "backends:"]
    for name, b in d["backends"].items():
        state = "yes" if b["available"] else "no"
        lines.append(f"  {name:<19}{state:<4}{b['detail']}")
    lines += ["", "build (tellneo._C):"]
    if d["build"] is None:
        lines.append("  not built")
    else:
        lines += [f"  {k:<14}{v}" for k, v in d["build"].items()]
    return "\n".join(lines)
