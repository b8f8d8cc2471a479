"""Fused ops: one module per op, each with its autograd function, argument checks, backend dispatch and a
readable plain-PyTorch reference of the same math."""

from tellneo.ops.fused_linear_kd import KDLossOutput, fused_linear_kd, fused_linear_kd_reference  # noqa: E402
from tellneo.ops.lora_linear import lora_dropout_mask, lora_linear, lora_linear_reference  # noqa: E402

__all__ = [
    "KDLossOutput",
    "fused_linear_kd",
    "fused_linear_kd_reference",
    "lora_dropout_mask",
    "lora_linear",
    "lora_linear_reference",
]
