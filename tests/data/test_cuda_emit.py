"""CUDA emit == C++ emit, bit for bit (runs only where a GPU is visible)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tellneo.data import TokenStore, emit_rows, plan

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("layout", ["rows", "flat"])
@pytest.mark.parametrize("token_dtype", [np.int32, np.int64])
def test_cuda_emit_is_bitwise_equal_to_cpp(seed, layout, token_dtype):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 700, size=400)
    tokens = rng.integers(0, 128256, size=int(lengths.sum())).astype(token_dtype)
    labels = np.where(rng.random(tokens.size) < 0.3, -100, tokens).astype(np.int64) if seed % 2 else None
    store = TokenStore.from_flat(tokens, np.concatenate([[0], np.cumsum(lengths)]), labels)
    p = plan(store.lengths, 1024, strategy=["bfd", "ffd", "wrap"][seed % 3], overlong="split")
    rows = rng.permutation(p.num_rows)[:64]
    cpu = emit_rows(store, p, rows, layout=layout, backend="cpp")
    gpu = emit_rows(store, p, rows, layout=layout, backend="cuda", device="cuda")
    for k, v in cpu.items():
        if isinstance(v, torch.Tensor):
            assert gpu[k].device.type == "cuda"
            assert torch.equal(gpu[k].cpu(), v), k
        else:
            assert gpu[k] == v, k
