"""Fused ops: one module per op, each with its autograd function, argument checks, backend dispatch and a
readable plain-PyTorch reference of the same math."""

from tellneo.ops.fused_linear_kd import KDLossOutput, fused_linear_kd, fused_linear_kd_reference  # noqa: E402,F401
