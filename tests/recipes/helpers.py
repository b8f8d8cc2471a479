"""Tiny models, learnable data and fixtures shared by the recipe and training-command tests.

A plain module, not a conftest.py (another test imports ``tiny_llama_config`` with ``from conftest import``, which
a second conftest module would shadow): test modules import the fixtures they use from here. Session-wide
artefacts are cached in this module, so modules that import the same fixture share one copy.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tellneo.data import TokenStore
from tests.conftest import tiny_llama_config

VOCAB = 251


def tiny_teacher(seed: int = 0, **overrides):
    """A 4-layer random Llama (vocab 251, hidden 64) in eval mode. Its output head is scaled up (std 0.2 instead
    of 0.02) so that logits can move far enough for a frozen head + LoRA student to learn visibly."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=4)
    cfg.update(overrides)
    model = LlamaForCausalLM(tiny_llama_config(**cfg)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    return model


def learnable_store(n: int = 48, seed: int = 0, prompt: int = 3) -> TokenStore:
    """Prefixes of four fixed random token sequences: after the first tokens the continuation is memorisable.
    The first ``prompt`` tokens of each sample are not trained (label -100)."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, VOCAB, size=(4, 40))
    samples, labels = [], []
    for k, length in zip(rng.integers(0, 4, size=n), rng.integers(8, 40, size=n)):
        s = phrases[k, : int(length)]
        samples.append(s)
        labels.append(np.where(np.arange(s.size) < prompt, -100, s))
    return TokenStore.from_sequences(samples, labels)


@pytest.fixture(autouse=True)
def one_thread():  # import it into a test module to apply it there
    """Tiny models run far faster on one thread, especially on a shared machine (no OpenMP barrier waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _smollm2_tokenizer():
    from tellneo.models import load_causal_lm

    return load_causal_lm(None, tokenizer_only=True)[1]


@pytest.fixture
def smollm2_tokenizer():
    """The embedded model's tokenizer only (chat template included), loaded once per session. Do not modify."""
    return _smollm2_tokenizer()


@functools.cache
def _tiny_model_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tellneo-tiny-model-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return save_tiny_model_dir(root / "model", _smollm2_tokenizer())


@pytest.fixture
def tiny_model_dir() -> Path:
    """A 4-layer, hidden-32 random Llama with the embedded model's tokenizer (vocab 49152), saved as an HF dir
    once per session. Read only."""
    return _tiny_model_dir()


@pytest.fixture
def general_jsonl(tmp_path) -> Path:
    """80 short prompt/response records."""
    path = tmp_path / "general.jsonl"
    rows = [{"prompt": f"Tell me about the number {i}.",
             "response": f"The number {i} is " + "quite nice. " * (1 + i % 5)} for i in range(80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_model_dir(path, tokenizer, *, seed: int = 0, **overrides):
    """An HF model directory: a tiny random Llama over the given tokenizer's vocabulary (hidden 32), with the
    tokenizer saved beside it. Returns the path."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.update(overrides)
    model = LlamaForCausalLM(tiny_llama_config(**cfg))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
