"""Names shared by the ops and the CLI, in a module that imports nothing: building the CLI's flags (``--help``)
must not load torch (about 2.5 s on a small CPU machine)."""

from __future__ import annotations

#: The divergence names :func:`tellneo.ops.fused_linear_kd` accepts (public as ``tellneo.ops.DIVERGENCES``; the
#: Triton kernels' integer codes are the positions in this tuple).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

#: ``--merged-dtype`` choices, the keys of :data:`tellneo.recipes.outputs.MERGED_DTYPES` in the same order.
MERGED_DTYPE_NAMES = ("fp32", "bf16", "fp16")
