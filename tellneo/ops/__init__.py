"""Fused ops: one module per op, each with its autograd function, argument checks, backend dispatch and a
readable plain-PyTorch reference of the same math."""
