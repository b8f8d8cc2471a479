"""Tolerances and error budgets shared by the op tests.

The house rule (flash-attention, CCE): a kernel's error against an fp32/fp64 reference may be at most ~2x the
error that plain same-dtype PyTorch makes against that reference, plus a small floor for exact-zero cases.
"""

from __future__ import annotations

import torch

from tellneo.bench import rel_error  # noqa: F401  (re-exported for the op tests)

# Plain tolerances for comparisons between two implementations that both compute in the given dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
}


def assert_error_budget(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "output",
) -> None:
    """rel_error(actual, reference) <= factor * rel_error(baseline, reference) + floor.

    ``reference`` is the high-precision result; ``baseline`` the same math in plain PyTorch at the kernel's dtype.
    """
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, budget = rel_error(actual, reference), factor * rel_error(baseline, reference) + floor
    assert err <= budget, f"{name}: relative error {err:.3e} exceeds budget {budget:.3e}"
