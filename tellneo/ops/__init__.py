"""Fused ops with their plain-PyTorch references.

Each op is a package-private set of modules around one public module: ``fused_linear_kd`` (the public API and
reference) over ``_kd_args`` (argument checks), ``_kd_op`` (the ``torch.library`` custom ops), ``_kd_torch`` /
``_kd_triton`` (the two backends) and ``divergences`` (the per-token KD math); ``lora_linear`` over
``_lora_torch``. The Triton kernels themselves live in :mod:`tellneo.kernels` and import nothing from here.
"""

from tellneo.ops.divergences import DIVERGENCES
from tellneo.ops.fused_linear_kd import KDLossOutput, fused_linear_kd, fused_linear_kd_reference, topk_logprobs
from tellneo.ops.lora_linear import lora_dropout_mask, lora_linear, lora_linear_reference

__all__ = [
    "DIVERGENCES",
    "KDLossOutput",
    "fused_linear_kd",
    "fused_linear_kd_reference",
    "lora_dropout_mask",
    "lora_linear",
    "lora_linear_reference",
    "topk_logprobs",
]
