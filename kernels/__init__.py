"""Triton kernels of tellneo, installed as the subpackage ``tellneo.kernels``.

Pure kernels and their launchers only: no autograd, no argument checks, no Hugging Face, and no import of any
other part of tellneo (``tests/ops/test_kernels_layering.py`` holds that), so the layering is one way:
``tellneo.ops`` (autograd, checks, dispatch, the plain-PyTorch references and the PyTorch halves of the
backends) calls the launchers here with plain tensors and Python scalars. Importing this package does not import
triton, nor does :mod:`tellneo.kernels.common` (the launch-time rules shared by every kernel: interpreter flag,
fp32 matmul precision, dropout scale); each kernel module does, so a machine without triton can still use every
other backend.
"""
