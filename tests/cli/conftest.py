"""Fixtures of the training-command tests: a tiny HF model directory over SmolLM2's tokenizer, small data files."""

from __future__ import annotations

import json

import pytest

from tests.recipes.conftest import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer, hidden-32 random Llama with the embedded model's tokenizer (vocab 49152), saved as an HF dir."""
    from tellneo.models import load_causal_lm

    tokenizer = load_causal_lm(None, tokenizer_only=True)[1]
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="session")
def general_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    rows = [{"prompt": f"Tell me about the number {i}.",
             "response": f"The number {i} is " + "quite nice. " * (1 + i % 5)} for i in range(80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
