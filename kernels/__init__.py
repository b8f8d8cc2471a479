"""Triton kernels of tellneo, installed as the subpackage ``tellneo.kernels``.

Pure kernels and their launch helpers only: no autograd, no Hugging Face. The autograd functions, argument checks,
dispatch and the plain-PyTorch references live in ``tellneo.ops``. Importing this package does not import triton;
each kernel module does, so a machine without triton can still use every other backend.
"""
