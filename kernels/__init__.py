"""Triton kernels of tellneo, installed as the subpackage ``tellneo.kernels``.

Pure kernels and their launchers only: no autograd, no argument checks, no Hugging Face, and no import of any
other part of tellneo (``tests/ops/test_kernels_layering.py`` holds that), so the layering is one way:
``tellneo.ops`` (autograd, checks, dispatch, the plain-PyTorch references and the PyTorch halves of the
backends) calls the launchers here with plain tensors and Python scalars. Importing this package does not import
triton, nor does :mod:`tellneo.kernels.common` (the launch-time rules shared by every kernel: interpreter flag,
fp32 matmul precision, dropout scale); each kernel module does, so a machine without triton can still use every
other backend.
"""


def _defer_to_installed_kernels() -> None:
    """Hand a top-level ``import kernels`` over to the installed Hugging Face ``kernels`` distribution.

    This directory is the package ``tellneo.kernels``; it is only ever imported as a top-level ``kernels`` by
    accident, when a checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -m benchmarks...`` run
    there). ``transformers`` >= 5.25 depends on the Hub's ``kernels`` package and imports names from it, so without
    this hand-over every ``import transformers`` model class fails inside a checkout. When no such distribution is
    installed this module stays what it is (importable, no ``__version__``), which transformers reads as "absent".
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout_root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout_root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed  # the import statement returns whatever sys.modules holds after this runs
    spec.loader.exec_module(installed)


if __name__ == "kernels":
    _defer_to_installed_kernels()
