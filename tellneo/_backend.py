"""Explicit backend dispatch shared by every op.

Each op accepts ``backend="auto" | "triton" | "torch" | "cpp" | "cuda"`` (the subset it implements). ``auto`` reads
``TELLNEO_BACKEND`` from the environment first; if that is unset or ``auto``, it picks the fastest backend for the
tensors' device (Triton/CUDA for CUDA tensors, C++/PyTorch for CPU tensors). A backend asked for by name that
cannot run raises :class:`BackendError`; ``auto`` skipping its first choice logs the reason once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger("tellneo")

BACKEND_ENV = "TELLNEO_BACKEND"
ALL_BACKENDS = ("auto", "triton", "torch", "cpp", "cuda")

_logged: set[tuple[str, str]] = set()


class BackendError(RuntimeError):
    """The requested backend cannot run this call."""


def log_once(key: tuple[str, str], message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(
    op: str,
    backend: str | None,
    *,
    is_cuda: bool,
    available: Mapping[str, Callable[[], str | None]],
    auto_cuda: Sequence[str],
    auto_cpu: Sequence[str],
) -> str:
    """Resolve ``backend`` for one call of ``op``.

    ``available`` maps each backend the op implements to a check that returns ``None`` when it can run this call
    or a reason why not. ``auto_cuda`` / ``auto_cpu`` are the preference orders used by ``auto``.
    """
    requested = "auto" if backend is None else backend
    if requested not in ALL_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {ALL_BACKENDS}, got {backend!r}")
    if requested == "auto":
        from_env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if from_env not in ALL_BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {ALL_BACKENDS}, got {from_env!r}")
        if from_env != "auto":
            if from_env in available and available[from_env]() is None:
                return from_env
            reason = "not implemented by this op" if from_env not in available else available[from_env]()
            log_once((op, f"env:{from_env}"), f"{op}: {BACKEND_ENV}={from_env} ignored ({reason}); using auto")
    else:
        if requested not in available:
            raise BackendError(f"{op}: backend {requested!r} is not implemented; choose from {sorted(available)}")
        reason = available[requested]()
        if reason is not None:
            raise BackendError(f"{op}: backend {requested!r} cannot run this call: {reason}")
        return requested

    order = auto_cuda if is_cuda else auto_cpu
    skipped: list[str] = []
    for name in order:
        reason = available[name]()
        if reason is None:
            if skipped:
                log_once((op, name), f"{op}: using backend {name!r} because {'; '.join(skipped)}")
            return name
        skipped.append(f"{name!r} is unavailable ({reason})")
    raise BackendError(f"{op}: no backend can run this call: {'; '.join(skipped)}")
