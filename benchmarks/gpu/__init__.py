"""The GPU campaign (``python -m benchmarks.gpu --help``; see README.md beside this file).

Importing this package imports nothing heavy: ``campaign`` sets ``TRITON_INTERPRET`` / ``TORCHDYNAMO_DISABLE``
for a dry run before torch or triton are imported.
"""
