"""Shared fixtures. Triton kernels run through the interpreter on CPU when no GPU is present (set before any
kernel module imports triton, because triton.jit reads TRITON_INTERPRET when a kernel is defined)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else CPU (Triton kernels then run under TRITON_INTERPRET=1)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session, float32, eval mode."""
    from tellneo.models import load_causal_lm

    model, tokenizer = load_causal_lm()
    model.eval()
    return model, tokenizer


def tiny_llama_config(**overrides):
    """A tiny random LlamaConfig for fast tests (vocab deliberately not a power of two)."""
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=251,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)
