"""Launch-time rules shared by every kernel module (no triton import here, so ``tellneo.ops`` can ask them
before deciding whether to load a kernel).

* :func:`interpreting`: ``TRITON_INTERPRET`` is set (kernels run on the CPU through Triton's interpreter).
* :func:`fp32_precision`: the one fp32 matmul-precision rule of tellneo's kernels. fp32 operands are multiplied
  in full IEEE fp32 (``input_precision="ieee"``) unless ``torch.backends.cuda.matmul.allow_tf32`` is set, in
  which case they use TF32 exactly like torch's own fp32 matmuls; so a kernel and the PyTorch reference it is
  tested against always make the same choice. Half-precision operands use the tensor cores' default (fp32
  accumulation) either way.
* :func:`dropout_keep_scale`: ``1 / (1 - p)``, the rescale of kept elements under inverted dropout (LoRA
  kernels and the LoRA op's torch path).
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET`` set and not ``0``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fp32_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: ``"ieee"`` for fp32 unless torch allows TF32
    for fp32 matmuls, else None (the default: TF32 for fp32, tensor cores for half types)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else None


def dropout_keep_scale(dropout_p: float) -> float:
    """``1 / (1 - p)``: what inverted dropout multiplies kept elements by (exactly 1.0 for ``p = 0``)."""
    return 1.0 / (1.0 - dropout_p)
